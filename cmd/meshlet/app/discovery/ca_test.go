package discovery

import (
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
)

func caFlagsFrom(t *testing.T, args ...string) *flagpole {
	t.Helper()
	cmd, f := newCommand(cli.Streams{}, env{})
	if err := cmd.ParseFlags(args); err != nil {
		t.Fatal(err)
	}
	return f
}

// TestCADefaults: the CA is on, on istiod's 15012, in the pod's namespace,
// serving for the istiod Service's names, issuing 24h certificates capped at
// 90 days in cluster.local.
func TestCADefaults(t *testing.T) {
	f := caFlagsFrom(t)
	o, on, err := f.ca.options(func(k string) string { return map[string]string{"POD_NAMESPACE": "istio-system"}[k] }, nil, nil, logr.Discard())
	if err != nil || !on {
		t.Fatalf("options: %v, enabled %v", err, on)
	}
	if o.Addr != ":15012" || o.Namespace != "istio-system" || o.TrustDomain != "cluster.local" ||
		o.WorkloadTTL != 24*time.Hour || o.MaxWorkloadTTL != 90*24*time.Hour || o.ServingDNSNames[0] != "istiod.istio-system.svc" {
		t.Errorf("defaults: %+v", o)
	}
	if _, on, err := caFlagsFrom(t, "--ca-addr", "-").ca.options(func(string) string { return "" }, nil, nil, logr.Discard()); on || err != nil {
		t.Errorf("--ca-addr=-: enabled %v, %v", on, err)
	}
}

// TestCABadFlags: every bad CA flag is named with its value, all at once.
func TestCABadFlags(t *testing.T) {
	f := caFlagsFrom(t, "--ca-addr", "15012", "--trust-domain", "Not_A_Domain", "--workload-cert-ttl", "48h", "--max-workload-cert-ttl", "24h")
	_, _, err := f.ca.options(func(string) string { return "" }, nil, nil, logr.Discard())
	if err == nil {
		t.Fatal("bad flags accepted")
	}
	for _, want := range []string{"--ca-addr=15012", `--trust-domain="Not_A_Domain"`, "--max-workload-cert-ttl=24h0m0s", `--ca-namespace=""`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not name %s: %v", want, err)
		}
	}
}
