package discovery

import (
	"bytes"
	"strings"
	"testing"

	"github.com/go-logr/logr"
	"k8s.io/client-go/rest"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
)

// TestBadFlags: every bad flag is named with its value, all at once.
func TestBadFlags(t *testing.T) {
	var out bytes.Buffer
	cmd, f := newCommand(cli.Streams{Out: &out, Err: &out}, env{getenv: func(string) string { return "" },
		restConfig: func(string) (*rest.Config, error) { return &rest.Config{Host: "https://127.0.0.1:1"}, nil }})
	if err := cmd.ParseFlags([]string{"--xds-addr", "15010", "--metrics-addr", "nope", "--debounce", "0s", "--domain", ""}); err != nil {
		t.Fatal(err)
	}
	_, err := f.options(env{getenv: func(string) string { return "" }}, logr.Discard())
	if err == nil {
		t.Fatal("bad flags accepted")
	}
	for _, want := range []string{"--xds-addr=15010", "--metrics-addr=nope", "--debounce=0s", "--domain=\"\""} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not name %s: %v", want, err)
		}
	}
}

// TestDefaults: istiod's ports, the pod name as replica.
func TestDefaults(t *testing.T) {
	cmd, f := newCommand(cli.Streams{}, env{})
	if err := cmd.ParseFlags(nil); err != nil {
		t.Fatal(err)
	}
	opts, err := f.options(env{getenv: func(k string) string { return map[string]string{"POD_NAME": "discovery-abc"}[k] },
		restConfig: func(string) (*rest.Config, error) { return &rest.Config{Host: "https://127.0.0.1:1"}, nil }}, logr.Discard())
	if err != nil {
		t.Fatal(err)
	}
	if opts.XDSAddr != ":15010" || opts.MetricsAddr != ":15014" || opts.Replica != "discovery-abc" || opts.RootNamespace != "istio-system" {
		t.Fatalf("defaults: %+v", opts)
	}
}
