package l7

import (
	"fmt"
	"io"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
)

// TestBalancersUnderSkew: one endpoint is fast, one is 40ms slow. Round
// robin splits evenly regardless; least-request (P2C) and Peak-EWMA shift
// load to the fast endpoint, Peak-EWMA the most (it sees latency, not only
// queue depth, so it wins even at low concurrency).
func TestBalancersUnderSkew(t *testing.T) {
	t.Parallel()
	fast := startBackend(t, "fast", nil)
	slow := startBackend(t, "slow", func(w http.ResponseWriter, r *http.Request) {
		time.Sleep(40 * time.Millisecond)
		io.WriteString(w, "slow")
	})
	share := map[string]float64{}
	for _, lb := range []string{config.LBRoundRobin, config.LBLeastRequest, config.LBPeakEWMA} {
		cfg := mustLoad(t, fmt.Sprintf(`
services: [{name: s, hosts: [s], routes: [{name: r, destinations: [{cluster: c}]}]}]
clusters:
- {name: c, loadBalancer: %s, endpoints: [{address: %q}, {address: %q}]}
`, lb, fast.addr, slow.addr))
		tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
		c := h1Client()
		var mu sync.Mutex
		counts := map[string]int{}
		var wg sync.WaitGroup
		const workers, per = 4, 40
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := 0; i < per; i++ {
					_, h, _ := get(t, c, tp.addr, "s", "/")
					mu.Lock()
					counts[h.Get("X-Backend")]++
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		share[lb] = float64(counts["fast"]) / float64(workers*per)
	}
	t.Logf("fast endpoint share: %v", share)
	if s := share[config.LBRoundRobin]; s < 0.4 || s > 0.6 {
		t.Errorf("round robin fast share %.2f; want ≈0.5", s)
	}
	if share[config.LBLeastRequest] < 0.6 {
		t.Errorf("least request fast share %.2f; want > 0.6", share[config.LBLeastRequest])
	}
	// Quiet machine: ≈0.97. On a loaded one the fast endpoint is slowed
	// too and the share drops (0.80 seen); it stays far above RR's 0.5.
	if share[config.LBPeakEWMA] < 0.75 || share[config.LBPeakEWMA] < share[config.LBRoundRobin] {
		t.Errorf("peak EWMA fast share %.2f; want > 0.75", share[config.LBPeakEWMA])
	}
}
