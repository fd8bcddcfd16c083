package l7

import (
	"fmt"
	"net/http"
	"testing"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
)

// TestRetryBudgetCountsForwardedRequestsOnly: the per-request step deposits
// in a route's retry budget only for requests that go upstream — a fault
// abort or a route to an undefined cluster earns no retries (as in Envoy,
// where the fault filter answers before the router) — on every path: the
// HTTP/1.1 codec, net/http's h2c server and the frame forwarder.
func TestRetryBudgetCountsForwardedRequestsOnly(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "be", nil)
	for _, tc := range []struct {
		name string
		h2c  bool
		fwd  string
	}{{"h1", false, ""}, {"h2c-nethttp", true, config.H2NetHTTP}, {"h2c-frames", true, config.H2Frames}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := mustLoad(t, fmt.Sprintf(`
services:
- name: ok
  hosts: [ok]
  routes: [{name: r, retries: {attempts: 1, budget: {ratio: 0.5}}, destinations: [{cluster: c}]}]
- name: aborted
  hosts: [aborted]
  routes: [{name: r, retries: {attempts: 1, budget: {ratio: 0.5}}, fault: {abort: {httpStatus: 418, percent: 100}}, destinations: [{cluster: c}]}]
- name: nocluster
  hosts: [nocluster]
  routes: [{name: r, retries: {attempts: 1, budget: {ratio: 0.5}}, destinations: [{cluster: c}]}]
clusters:
- name: c
  endpoints: [{address: %q}]
`, be.addr))
			cfg.HTTP2Forwarder = tc.fwd
			tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
			cfg.Services[2].Routes[0].Destinations[0].Cluster = "undefined"
			if err := tp.Update(cfg); err != nil {
				t.Fatal(err)
			}
			c, _ := countingClient(tc.h2c)
			for host, want := range map[string]int{"ok": 200, "aborted": 418, "nocluster": http.StatusServiceUnavailable} {
				for i := 0; i < 3; i++ {
					if code, _, _ := get(t, c, tp.addr, host, "/"); code != want {
						t.Fatalf("%s: %d, want %d", host, code, want)
					}
				}
			}
			svcs := tp.tab.Load().services
			for i, want := range []float64{3, 0, 0} {
				if got := svcs[i].Routes[0].Budget.Requests(); got != want {
					t.Errorf("service %s: %v retry-budget deposits, want %v", svcs[i].Config.Name, got, want)
				}
			}
			if tc.fwd == config.H2Frames {
				requireEngine(t, tp, config.H2Frames)
			}
		})
	}
}
