package agent_test

import (
	"net"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/proctest"
)

// TestNoCaptureListeners: with --capture-listeners=false (what the injector
// passes for interception mode NONE and gateways) the agent becomes ready
// and serves health and stats, while nothing listens on the capture ports.
func TestNoCaptureListeners(t *testing.T) {
	p := startAgent(t, httpBackend(t), "--capture-listeners=false")
	for _, addr := range []string{p.outbound, p.inbound} {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err == nil {
			c.Close()
			t.Errorf("capture listener %s accepts connections", addr)
		}
	}
	if code, body := proctest.HTTPGet("http://" + p.health + "/healthz/ready"); code != 200 {
		t.Errorf("proxy health %d: %s", code, body)
	}
	if gens := p.info(t).Generations; len(gens) == 0 || gens[0].State != "ACTIVE" {
		t.Errorf("no active generation: %+v", gens)
	}
}
