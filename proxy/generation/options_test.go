package generation_test

import (
	"testing"

	"github.com/meshlet/meshlet/proxy/generation"
)

// TestNewOptionsDefaults: the defaults pass Validate and listen on Istio's
// ports, as the agent's do (the agent passes its own addresses on).
func TestNewOptionsDefaults(t *testing.T) {
	o := generation.NewOptions()
	if err := o.Validate(); err != nil {
		t.Fatalf("defaults refused: %v", err)
	}
	got := []string{o.OutboundAddr, o.InboundAddr, o.HealthAddr, o.PrometheusAddr, o.AdminAddr}
	want := []string{":15001", ":15006", ":15021", ":15090", "127.0.0.1:15000"}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("default listener %d = %q; want %q", i, got[i], want[i])
		}
	}
}
