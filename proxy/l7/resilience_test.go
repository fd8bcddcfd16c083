package l7

import (
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/l4"
)

func oneClusterConfig(route, cluster string, addrs ...string) string {
	var eps []string
	for _, a := range addrs {
		eps = append(eps, fmt.Sprintf("{address: %q}", a))
	}
	return fmt.Sprintf(`
services:
- name: s
  hosts: [s]
  routes:
  - name: r
%s
    destinations: [{cluster: c}]
clusters:
- name: c
  endpoints: [%s]
%s
`, route, strings.Join(eps, ", "), cluster)
}

func TestRetryTurnsFlaky503IntoSuccess(t *testing.T) {
	t.Parallel()
	var n atomic.Int64
	be := startBackend(t, "flaky", func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		if n.Add(1)%2 == 1 { // every other request fails
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintf(w, "ok %s", body)
	})
	for _, tc := range []struct {
		name    string
		retries string
		wantOK  bool
	}{
		{"without retries", "", false},
		{"with retries", "    retries: {attempts: 2, retryOn: [\"503\"], baseInterval: 1ms}", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tp := startProxy(t, mustLoad(t, oneClusterConfig(tc.retries, "", be.addr)), "127.0.0.1:80", l4.Outbound)
			c := h1Client()
			failures := 0
			for i := 0; i < 40; i++ {
				// A POST body must be replayed on the retry.
				req, _ := http.NewRequest(http.MethodPost, "http://"+tp.addr+"/", strings.NewReader(fmt.Sprintf("body-%d", i)))
				req.Host = "s"
				resp, err := c.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					failures++
				} else if string(b) != fmt.Sprintf("ok body-%d", i) {
					t.Fatalf("replayed body: %q", b)
				}
			}
			if tc.wantOK && failures != 0 || !tc.wantOK && failures < 10 {
				t.Fatalf("%d of 40 failed", failures)
			}
		})
	}
}

func TestRetryBudget(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "down", func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(503) })
	for _, tc := range []struct {
		name   string
		budget string
		lo, hi int64
	}{
		// 3 retries each: 4 attempts per request without a budget.
		{"no budget", "", 400, 400},
		// 20% budget, no floor: at most 120 attempts for 100 requests.
		{"budget 20%", ", budget: {ratio: 0.2, minPerSecond: 0}", 100, 121},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := be.count.Load()
			tp := startProxy(t, mustLoad(t, oneClusterConfig("    retries: {attempts: 3, retryOn: [5xx], baseInterval: 1ms"+tc.budget+"}", "", be.addr)), "127.0.0.1:80", l4.Outbound)
			c := h1Client()
			for i := 0; i < 100; i++ {
				if code, _, _ := get(t, c, tp.addr, "s", "/"); code != 503 {
					t.Fatalf("status %d", code)
				}
			}
			got := be.count.Load() - before
			if got < tc.lo || got > tc.hi {
				t.Fatalf("upstream attempts %d, want [%d,%d]", got, tc.lo, tc.hi)
			}
		})
	}
}

func TestRetryPerTryTimeoutAndConnectFailure(t *testing.T) {
	t.Parallel()
	var n atomic.Int64
	be := startBackend(t, "slow-first", func(w http.ResponseWriter, r *http.Request) {
		if n.Add(1) == 1 {
			select {
			case <-time.After(5 * time.Second):
			case <-r.Context().Done():
			}
			return
		}
		io.WriteString(w, "second")
	})
	dead := unusedAddr(t)
	cfg := mustLoad(t, oneClusterConfig("    retries: {attempts: 3, perTryTimeout: 200ms, retryOn: [connect-failure, 5xx], baseInterval: 1ms}", "", be.addr, dead))
	tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	c := h1Client()
	for i := 0; i < 10; i++ {
		start := time.Now()
		code, _, body := get(t, c, tp.addr, "s", "/")
		if code != 200 || body != "second" {
			t.Fatalf("request %d: %d %q (retry should hide the hung attempt and the dead endpoint)", i, code, body)
		}
		if time.Since(start) > 4500*time.Millisecond { // the hung attempt would take 5s
			t.Fatalf("took %v", time.Since(start))
		}
	}
}

// TestPerTryTimeoutWithoutRetries: attempts 0 still bounds the one try.
func TestPerTryTimeoutWithoutRetries(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "hung", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(5 * time.Second):
		case <-r.Context().Done():
		}
	})
	cfg := mustLoad(t, oneClusterConfig("    retries: {attempts: 0, perTryTimeout: 100ms}", "", be.addr))
	tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	start := time.Now()
	code, _, _ := get(t, h1Client(), tp.addr, "s", "/")
	if code != http.StatusGatewayTimeout || time.Since(start) > 4*time.Second {
		t.Fatalf("got %d after %v; want 504 after the 100ms per-try timeout", code, time.Since(start))
	}
	if n := be.count.Load(); n != 1 {
		t.Fatalf("upstream saw %d requests; want 1 (attempts 0: no retry)", n)
	}
}

func TestCircuitBreakerOpensAndRecovers(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	release := make(chan struct{})
	var inflight atomic.Int64
	be := startBackend(t, "blocking", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/block" {
			mu.Lock()
			ch := release
			mu.Unlock()
			inflight.Add(1)
			<-ch
		}
		io.WriteString(w, "done")
	})
	for _, tc := range []struct{ name, pool string }{
		{"maxRequests", "  connectionPool: {maxRequests: 2}"},
		{"maxConnections+pending", "  connectionPool: {maxConnections: 1, maxPendingRequests: 1}"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mu.Lock()
			release = make(chan struct{})
			mu.Unlock()
			inflight.Store(0)
			tp := startProxy(t, mustLoad(t, oneClusterConfig("", tc.pool, be.addr)), "127.0.0.1:80", l4.Outbound)
			c := h1Client()
			var wg sync.WaitGroup
			codes := make(chan int, 2)
			cl := tp.tab.Load().clusters["c"]
			for i := 0; i < 2; i++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					code, _, _ := get(t, c, tp.addr, "s", "/block")
					codes <- code
				}()
				// One at a time: the first holds the connection, the second waits
				// for it (pending) or holds the second request slot.
				if i == 0 || tc.name == "maxRequests" {
					waitUntil(t, func() bool { return inflight.Load() == int64(i+1) })
				} else {
					waitUntil(t, func() bool { return cl.Pending() == 1 })
				}
			}
			code, h, _ := get(t, c, tp.addr, "s", "/x")
			if code != 503 || h.Get("X-Meshlet-Overflow") != "true" {
				t.Fatalf("third request: %d %v; want 503 overflow", code, h)
			}
			close(release)
			wg.Wait()
			close(codes)
			for code := range codes {
				if code != 200 {
					t.Fatalf("admitted request got %d", code)
				}
			}
			if code, _, _ := get(t, c, tp.addr, "s", "/x"); code != 200 {
				t.Fatalf("after recovery: %d", code)
			}
			if v := float64(tp.m.overflow.WithLabelValues("c", map[bool]string{true: "requests", false: "pending"}[tc.name == "maxRequests"]).Value()); v < 1 {
				t.Fatalf("overflow metric %v", v)
			}
		})
	}
}

// TestOutlierEjectionAndReturn: three consecutive 5xx eject an endpoint
// for baseEjectionTime, during which it gets no request, and it returns
// once that time has passed. The engine's clock is the test's, so however
// slow the machine, the ejection neither ends early nor needs waiting for.
func TestOutlierEjectionAndReturn(t *testing.T) {
	t.Parallel()
	var bad atomic.Bool
	bad.Store(true)
	good := startBackend(t, "good", nil)
	flaky := startBackend(t, "flaky", func(w http.ResponseWriter, r *http.Request) {
		if bad.Load() {
			w.WriteHeader(500)
			return
		}
		io.WriteString(w, "recovered")
	})
	// The engine's clock stands still but for the test's moves, so a slow
	// run cannot carry the 29s check past the 30s ejection.
	var skew atomic.Int64 // how far the test moved the engine's clock
	base := time.Now()
	clock := func() time.Time { return base.Add(time.Duration(skew.Load())) }
	cfg := mustLoad(t, oneClusterConfig("", "  outlierDetection: {consecutive5xx: 3, baseEjectionTime: 30s, maxEjectionPercent: 50}", good.addr, flaky.addr))
	tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound, func(o *Options) { o.clock = clock })
	c := h1Client()
	// Round robin: the flaky endpoint gets every other request until 3 consecutive 5xx.
	for i := 0; i < 6; i++ {
		get(t, c, tp.addr, "s", "/")
	}
	if v := float64(tp.m.ejections.WithLabelValues("c").Value()); v != 1 {
		t.Fatalf("ejections = %v, want 1", v)
	}
	before := flaky.count.Load()
	for i := 0; i < 30; i++ {
		if code, _, _ := get(t, c, tp.addr, "s", "/"); code != 200 {
			t.Fatalf("request %d during ejection got %d", i, code)
		}
	}
	if got := flaky.count.Load() - before; got != 0 {
		t.Fatalf("ejected endpoint got %d requests", got)
	}
	bad.Store(false)
	skew.Store(int64(29 * time.Second))
	get(t, c, tp.addr, "s", "/")
	get(t, c, tp.addr, "s", "/")
	if got := flaky.count.Load() - before; got != 0 {
		t.Fatalf("endpoint back after 29s of a 30s ejection: %d requests", got)
	}
	skew.Store(int64(31 * time.Second))
	before = flaky.count.Load()
	for i := 0; i < 10; i++ {
		get(t, c, tp.addr, "s", "/")
	}
	if got := flaky.count.Load() - before; got != 5 {
		t.Fatalf("endpoint got %d of 10 round-robin requests after the ejection interval, want 5", got)
	}
}

func TestActiveHealthCheck(t *testing.T) {
	t.Parallel()
	var healthy atomic.Bool
	a := startBackend(t, "a", nil)
	b := startBackend(t, "b", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" && !healthy.Load() {
			w.WriteHeader(503)
			return
		}
		io.WriteString(w, "b")
	})
	cfg := mustLoad(t, oneClusterConfig("", "  healthCheck: {path: /healthz, interval: 50ms, unhealthyThreshold: 1, healthyThreshold: 1}", a.addr, b.addr))
	tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	c := h1Client()
	waitUntil(t, func() bool { return tp.tab.Load().clusters["c"].Endpoints()[1].Unhealthy() })
	for i := 0; i < 20; i++ {
		if code, h, body := get(t, c, tp.addr, "s", "/"); h.Get("X-Backend") != "a" {
			t.Fatalf("request %d: %d %q from %q; want endpoint a only (b is unhealthy)", i, code, body, h.Get("X-Backend"))
		}
	}
	healthy.Store(true)
	waitUntil(t, func() bool { return !tp.tab.Load().clusters["c"].Endpoints()[1].Unhealthy() })
	seen := map[string]bool{}
	for i := 0; i < 10; i++ {
		_, h, _ := get(t, c, tp.addr, "s", "/")
		seen[h.Get("X-Backend")] = true
	}
	if !seen["b"] {
		t.Fatal("healthy again but b got no traffic")
	}
}

func waitUntil(t testing.TB, f func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !f() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 5s")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestFaultPercentages(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", nil)
	cfg := mustLoad(t, oneClusterConfig("    fault: {abort: {httpStatus: 418, percent: 30}, delay: {fixed: 30ms, percent: 10}}", "", be.addr))
	tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	c := h1Client()
	const n = 600
	aborted, delayed := 0, 0
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for i := 0; i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			start := time.Now()
			code, _, _ := get(t, c, tp.addr, "s", "/")
			d := time.Since(start)
			mu.Lock()
			defer mu.Unlock()
			if code == 418 {
				aborted++
			} else if code != 200 {
				t.Errorf("status %d", code)
			}
			if d >= 30*time.Millisecond {
				delayed++
			}
		}()
	}
	wg.Wait()
	if !binomialOK(aborted, n, 0.30) {
		t.Errorf("aborted %d of %d; want ≈30%%", aborted, n)
	}
	// Delays are counted by the metric (wall time may also be slow on a busy machine).
	if d := int(float64(tp.m.faults.WithLabelValues("s/r", "delay").Value())); !binomialOK(d, n, 0.10) || delayed < d {
		t.Errorf("delayed %d (slow responses %d) of %d; want ≈10%%", d, delayed, n)
	}
	if v := int(float64(tp.m.requests.WithLabelValues("outbound", "s/r", "c", "4xx").Value())); v != aborted {
		t.Errorf("requests_total 4xx = %d; want the %d aborted requests", v, aborted)
	}
	t.Logf("aborted %.3f delayed %.3f", float64(aborted)/n, float64(tp.m.faults.WithLabelValues("s/r", "delay").Value())/n)
}

func TestMirror(t *testing.T) {
	t.Parallel()
	main := startBackend(t, "main", nil)
	got := make(chan string, 10)
	shadow := startBackend(t, "shadow", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		got <- r.Host + " " + r.Method + " " + string(b)
	})
	cfg := mustLoad(t, fmt.Sprintf(`
services:
- name: s
  hosts: [s]
  routes:
  - name: r
    mirror: {cluster: shadow}
    destinations: [{cluster: main}]
clusters:
- {name: main, endpoints: [{address: %q}]}
- {name: shadow, endpoints: [{address: %q}]}
`, main.addr, shadow.addr))
	tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	req, _ := http.NewRequest(http.MethodPut, "http://"+tp.addr+"/m", strings.NewReader("payload"))
	req.Host = "s:8080"
	resp, err := h1Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.Header.Get("X-Backend") != "main" {
		t.Fatalf("primary response from %q", resp.Header.Get("X-Backend"))
	}
	select {
	case m := <-got:
		if m != "s-shadow:8080 PUT payload" {
			t.Fatalf("mirrored %q", m)
		}
	case <-time.After(3 * time.Second):
		t.Fatal("no mirrored request")
	}
}

func TestDNSCluster(t *testing.T) {
	t.Parallel()
	a := startBackend(t, "a", nil)
	b := startBackend(t, "b", nil)
	res := &fakeResolver{}
	res.set("127.0.0.1") // both backends are on 127.0.0.1 with different ports: resolve to one, then switch
	aPort := a.addr[strings.LastIndexByte(a.addr, ':')+1:]
	cfg := mustLoad(t, fmt.Sprintf(`
services:
- name: s
  hosts: [s]
  routes: [{name: r, destinations: [{cluster: c}]}]
clusters:
- name: c
  dns: {name: reviews.default.svc.cluster.local, port: %s, refresh: 50ms}
`, aPort))
	tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound, func(o *Options) { o.Resolver = res })
	if _, h, _ := get(t, h1Client(), tp.addr, "s", "/"); h.Get("X-Backend") != "a" {
		t.Fatalf("DNS cluster served by %q", h.Get("X-Backend"))
	}
	if res.lastHost() != "reviews.default.svc.cluster.local" {
		t.Fatalf("resolved %q", res.lastHost())
	}
	_ = b
	res.fail(true) // lookup errors keep the last good endpoints
	time.Sleep(120 * time.Millisecond)
	if _, h, _ := get(t, h1Client(), tp.addr, "s", "/"); h.Get("X-Backend") != "a" {
		t.Fatalf("after DNS failure served by %q", h.Get("X-Backend"))
	}
	if v := float64(tp.m.dnsFail.WithLabelValues("c").Value()); v < 1 {
		t.Fatalf("dns failures metric %v", v)
	}
}
