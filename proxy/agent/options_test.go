package agent_test

import (
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/agent"
)

func TestOptionsValidate(t *testing.T) {
	if err := agent.NewOptions().Validate(); err != nil {
		t.Fatalf("defaults refused: %v", err)
	}
	if err := (agent.Options{}).Validate(); err != nil {
		t.Fatalf("zero options (documented defaults) refused: %v", err)
	}
	o := agent.NewOptions()
	o.DrainDuration, o.StartTimeout, o.AdminAddr, o.StatusAddr = -time.Second, -2*time.Second, "15000", "localhost"
	err := o.Validate()
	if err == nil {
		t.Fatal("bad options accepted")
	}
	// Every problem is reported, each naming the option and its value.
	for _, want := range []string{`drain duration: invalid value -1s`, `start timeout: invalid value -2s`, `admin address: invalid value "15000"`, `status address: invalid value "localhost"`} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not contain %q", err, want)
		}
	}
	if _, err := agent.New(o); err == nil {
		t.Error("New accepted options Validate refuses")
	}
}

// TestOptionsDefaultPorts: the default listeners are Istio's ports (the
// injected pod's probes, port names and capture rules assume them).
func TestOptionsDefaultPorts(t *testing.T) {
	o := agent.NewOptions()
	got := []string{o.OutboundAddr, o.InboundAddr, o.HealthAddr, o.PrometheusAddr, o.AdminAddr, o.StatusAddr}
	want := []string{":15001", ":15006", ":15021", ":15090", "127.0.0.1:15000", ":15020"}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("default listener %d = %q; want %q", i, got[i], want[i])
		}
	}
}
