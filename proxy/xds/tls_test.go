package xds_test

import (
	"log/slog"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l7"
	"github.com/meshlet/meshlet/proxy/stats"
	"github.com/meshlet/meshlet/proxy/xds"
)

// TestSettingsUseTLS: TLS is on for the discovery server's TLS port unless
// turned off, on or off as asked otherwise; the server name defaults to the
// address's host; a bad mode or address is an error naming it.
func TestSettingsUseTLS(t *testing.T) {
	for _, tc := range []struct {
		s        xds.Settings
		tls      bool
		name     string
		errMatch string
	}{
		{s: xds.Settings{Address: "istiod.istio-system.svc:15012"}, tls: true, name: "istiod.istio-system.svc"},
		{s: xds.Settings{Address: "istiod.istio-system.svc:15010"}, tls: false, name: "istiod.istio-system.svc"},
		{s: xds.Settings{Address: "10.0.0.1:15012", TLS: xds.TLSOff}, tls: false, name: "10.0.0.1"},
		{s: xds.Settings{Address: "10.0.0.1:9000", TLS: xds.TLSOn, ServerName: "istiod.mesh.svc"}, tls: true, name: "istiod.mesh.svc"},
		{s: xds.Settings{Address: "istiod:15012", TLS: "yes"}, errMatch: `TLS mode "yes"`},
		{s: xds.Settings{Address: "istiod"}, errMatch: `discovery address "istiod"`},
	} {
		on, name, err := tc.s.UseTLS()
		if tc.errMatch != "" {
			if err == nil || !strings.Contains(err.Error(), tc.errMatch) {
				t.Errorf("%+v: err %v, want %q", tc.s, err, tc.errMatch)
			}
			continue
		}
		if err != nil || on != tc.tls || name != tc.name {
			t.Errorf("%+v: UseTLS = %v, %q, %v; want %v, %q", tc.s, on, name, err, tc.tls, tc.name)
		}
	}
}

// TestStartGenerationTLSNeedsIdentity: xDS over TLS without a workload
// identity is refused at start with a message saying what is missing, not
// retried forever.
func TestStartGenerationTLSNeedsIdentity(t *testing.T) {
	t.Setenv("POD_NAME", "client-0")
	t.Setenv("POD_NAMESPACE", "shop")
	t.Setenv("INSTANCE_IP", "10.1.0.9")
	eng, err := l7.New(config.L7{}, l7.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer eng.Close()
	_, _, err = xds.StartGeneration(slog.New(slog.DiscardHandler), xds.Settings{Address: "istiod.istio-system.svc:15012"},
		config.L7{}, eng, stats.NewPrivate(), prometheus.NewRegistry())
	if err == nil || !strings.Contains(err.Error(), "needs the workload identity") {
		t.Fatalf("StartGeneration over TLS without an identity: %v", err)
	}
}
