package l7

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
)

// twoClusters routes host "svc" to cluster `to`; clusters a and b have one
// endpoint each.
func twoClusters(t testing.TB, to, a, b, extra string) config.L7 {
	return mustLoad(t, fmt.Sprintf(`
accessLog: {enabled: true}
services:
- name: svc
  hosts: [svc]
  routes: [{name: r, destinations: [{cluster: %s}]}]
clusters:
- name: a
  endpoints: [{address: %q}]
  outlierDetection: {consecutive5xx: 1, baseEjectionTime: 1h, maxEjectionPercent: 100}
- name: b
  endpoints: [{address: %q}]
%s`, to, a, b, extra))
}

// countingClient is an HTTP client that never retries and counts the
// connections it opens.
func countingClient(h2c bool) (*http.Client, *atomic.Int64) {
	var p http.Protocols
	if h2c {
		p.SetUnencryptedHTTP2(true)
	} else {
		p.SetHTTP1(true)
	}
	var dials atomic.Int64
	tr := &http.Transport{Protocols: &p, DisableCompression: true, MaxIdleConnsPerHost: 4}
	tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
		dials.Add(1)
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}
	return &http.Client{Transport: tr, Timeout: 10 * time.Second}, &dials
}

// TestUpdateSwapsTable: a request in flight when Update runs finishes on
// the old table (its backend), the next request on the same client
// connection takes the new route, and no connection is closed — over the
// HTTP/1.1 codec, net/http's h2c server and the frame forwarder.
func TestUpdateSwapsTable(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		h2c  bool
		fwd  string
	}{{"h1", false, ""}, {"h2c-nethttp", true, config.H2NetHTTP}, {"h2c-frames", true, config.H2Frames}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			release := make(chan struct{})
			entered := make(chan struct{}, 1)
			a := startBackend(t, "a", func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/slow" {
					entered <- struct{}{}
					<-release
				}
				fmt.Fprint(w, "a")
			})
			b := startBackend(t, "b", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "b") })
			cfg := twoClusters(t, "a", a.addr, b.addr, "")
			cfg.HTTP2Forwarder = tc.fwd
			tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
			c, dials := countingClient(tc.h2c)

			if code, _, body := get(t, c, tp.addr, "svc", "/"); code != 200 || body != "a" {
				t.Fatalf("before Update: %d %q, want 200 \"a\"", code, body)
			}
			slow := make(chan string, 1)
			go func() {
				req, _ := http.NewRequest(http.MethodGet, "http://"+tp.addr+"/slow", nil)
				req.Host = "svc"
				resp, err := c.Do(req)
				if err != nil {
					slow <- err.Error()
					return
				}
				defer resp.Body.Close()
				body, err := io.ReadAll(resp.Body)
				slow <- fmt.Sprintf("%d %s %s %v", resp.StatusCode, resp.Header.Get("X-Backend"), body, err)
			}()
			<-entered
			cfg2 := twoClusters(t, "b", a.addr, b.addr, "")
			cfg2.HTTP2Forwarder = tc.fwd
			if err := tp.Update(cfg2); err != nil {
				t.Fatalf("Update: %v", err)
			}
			// HTTP/1.1: the slow request holds its connection; the client
			// opens one more for this request. HTTP/2: same connection.
			var reused atomic.Bool
			ctx := httptrace.WithClientTrace(context.Background(), &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { reused.Store(i.Reused) }})
			req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+tp.addr+"/", nil)
			req.Host = "svc"
			resp, err := c.Do(req)
			if err != nil {
				t.Fatalf("after Update: %v", err)
			}
			resp.Body.Close()
			if got := resp.Header.Get("X-Backend"); resp.StatusCode != 200 || got != "b" {
				t.Fatalf("after Update: %d from %q, want 200 from b", resp.StatusCode, got)
			}
			close(release)
			if got := <-slow; got != "200 a a <nil>" {
				t.Fatalf("request in flight during Update: %q, want \"200 a\" (finished on the old table)", got)
			}
			// Every request after the first reuses a connection it had.
			if code, h, _ := get(t, c, tp.addr, "svc", "/"); code != 200 || h.Get("X-Backend") != "b" {
				t.Fatalf("third request: %d from %q", code, h.Get("X-Backend"))
			}
			wantDials := int64(2)
			if tc.h2c {
				wantDials = 1
				if !reused.Load() {
					t.Errorf("h2c request after Update did not reuse the connection")
				}
			}
			if n := dials.Load(); n != wantDials {
				t.Errorf("client opened %d connections, want %d (Update must not close connections)", n, wantDials)
			}
			if tc.fwd == config.H2Frames {
				requireEngine(t, tp, config.H2Frames)
			}
		})
	}
}

// TestUpdateCarriesClusterState: an Update that leaves a cluster's settings
// alone keeps the cluster itself — its ejected endpoint stays ejected, its
// upstream connection is reused — while a changed cluster is built anew.
func TestUpdateCarriesClusterState(t *testing.T) {
	t.Parallel()
	var fail atomic.Bool
	fail.Store(true)
	a := startBackend(t, "a", func(w http.ResponseWriter, r *http.Request) {
		if fail.Load() {
			w.WriteHeader(http.StatusInternalServerError)
		}
	})
	a2 := startBackend(t, "a2", nil)
	b := startBackend(t, "b", nil)
	cfg := mustLoad(t, fmt.Sprintf(`
services:
- name: svc
  hosts: [svc]
  routes: [{name: r, destinations: [{cluster: a}]}]
clusters:
- name: a
  endpoints: [{address: %q}, {address: %q}]
  outlierDetection: {consecutive5xx: 1, baseEjectionTime: 1h, maxEjectionPercent: 50}
- name: b
  endpoints: [{address: %q}]
`, a.addr, a2.addr, b.addr))
	tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	c := h1Client()
	for i := 0; i < 4; i++ {
		get(t, c, tp.addr, "svc", "/")
	}
	before := tp.tab.Load().clusters["a"]
	ejected := func(cl *upstream.Cluster) bool {
		for _, e := range cl.Endpoints() {
			if e.Addr() == a.addr {
				return e.Ejected()
			}
		}
		t.Fatalf("endpoint %s not in cluster", a.addr)
		return false
	}
	if !ejected(before) {
		t.Fatalf("endpoint %s not ejected after 500s", a.addr)
	}
	fail.Store(false)
	connsA2 := a2.conns.Load()

	// A route change only: cluster a is carried over.
	cfg.Services[0].Routes[0].Timeout = config.D(5 * time.Second)
	if err := tp.Update(cfg); err != nil {
		t.Fatal(err)
	}
	after := tp.tab.Load().clusters["a"]
	if after != before || !ejected(after) {
		t.Fatalf("cluster a rebuilt (%v) or ejection lost (ejected=%v) by an Update that did not change it", after != before, ejected(after))
	}
	for i := 0; i < 3; i++ {
		if code, h, _ := get(t, c, tp.addr, "svc", "/"); code != 200 || h.Get("X-Backend") != "a2" {
			t.Fatalf("request %d after Update: %d from %q, want 200 from a2 (a stays ejected)", i, code, h.Get("X-Backend"))
		}
	}
	if n := a2.conns.Load(); n != connsA2 {
		t.Errorf("a2 saw %d new upstream connections after an Update that kept its cluster, want 0", n-connsA2)
	}

	// A settings change (load balancer): a new cluster, state starts over.
	cfg.Clusters[0].LoadBalancer = config.LBLeastRequest
	if err := tp.Update(cfg); err != nil {
		t.Fatal(err)
	}
	if now := tp.tab.Load().clusters["a"]; now == before || ejected(now) {
		t.Fatalf("changed cluster a: rebuilt=%v ejected=%v, want a new cluster without ejections", now != before, ejected(now))
	}
}

// TestUpdateRejectsBadConfig: a bad configuration is refused with every
// problem named, and the running table keeps serving.
func TestUpdateRejectsBadConfig(t *testing.T) {
	t.Parallel()
	a := startBackend(t, "a", nil)
	b := startBackend(t, "b", nil)
	tp := startProxy(t, twoClusters(t, "a", a.addr, b.addr, ""), "127.0.0.1:80", l4.Outbound)
	before := tp.tab.Load()

	bad := twoClusters(t, "b", a.addr, b.addr, "")
	bad.Clusters[1].Endpoints[0].Address = "nowhere"
	bad.Services[0].Routes[0].Destinations[0].Subset = "v9"
	err := tp.Update(bad)
	for _, want := range []string{"clusters[1].endpoints[0].address", `"nowhere"`, "services[0].routes[0].destinations[0].subset", `"v9"`} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("Update error %v does not name %s", err, want)
		}
	}
	lim := twoClusters(t, "b", a.addr, b.addr, "limits: {maxHeaderBytes: 4096}\n")
	if err := tp.Update(lim); err == nil || !strings.Contains(err.Error(), "limits") {
		t.Errorf("Update changing limits: %v, want an error naming limits", err)
	}
	if tp.tab.Load() != before {
		t.Fatal("a refused Update replaced the table")
	}
	if code, h, _ := get(t, h1Client(), tp.addr, "svc", "/"); code != 200 || h.Get("X-Backend") != "a" {
		t.Fatalf("after refused Updates: %d from %q, want 200 from a", code, h.Get("X-Backend"))
	}
}

// TestUpdateEndpoints: the endpoint-only update moves traffic, keeps the
// cluster, and refuses what it cannot apply.
func TestUpdateEndpoints(t *testing.T) {
	t.Parallel()
	a := startBackend(t, "a", nil)
	b := startBackend(t, "b", nil)
	tp := startProxy(t, twoClusters(t, "a", a.addr, b.addr, ""), "127.0.0.1:80", l4.Outbound)
	cl := tp.tab.Load().clusters["a"]
	if err := tp.UpdateEndpoints("a", []config.Endpoint{{Address: b.addr}}); err != nil {
		t.Fatal(err)
	}
	if code, h, _ := get(t, h1Client(), tp.addr, "svc", "/"); code != 200 || h.Get("X-Backend") != "b" {
		t.Fatalf("after UpdateEndpoints: %d from %q, want 200 from b", code, h.Get("X-Backend"))
	}
	if tp.tab.Load().clusters["a"] != cl {
		t.Error("UpdateEndpoints replaced the cluster")
	}
	if err := tp.UpdateEndpoints("nope", nil); err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("unknown cluster: %v", err)
	}
	if err := tp.UpdateEndpoints("a", []config.Endpoint{{Address: "1.2.3.4"}}); err == nil || !strings.Contains(err.Error(), `"1.2.3.4"`) {
		t.Errorf("bad address: %v", err)
	}
	if code, h, _ := get(t, h1Client(), tp.addr, "svc", "/"); code != 200 || h.Get("X-Backend") != "b" {
		t.Fatalf("after refused UpdateEndpoints: %d from %q", code, h.Get("X-Backend"))
	}
}

// TestNoClusterIs503NC: a route to a cluster the configuration does not
// define (allowed by Update: a control plane may send the route first) is
// answered 503 with flag NC on every path, and serves once it arrives.
func TestNoClusterIs503NC(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		h2c  bool
		fwd  string
	}{{"h1", false, ""}, {"h2c-nethttp", true, config.H2NetHTTP}, {"h2c-frames", true, config.H2Frames}} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			a := startBackend(t, "a", nil)
			b := startBackend(t, "b", nil)
			cfg := twoClusters(t, "a", a.addr, b.addr, "")
			cfg.HTTP2Forwarder = tc.fwd
			tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
			cfg.Services[0].Routes[0].Destinations[0].Cluster = "later"
			if err := cfg.Validate(); err == nil {
				t.Fatal("Validate accepts a route to an undefined cluster")
			}
			if err := tp.Update(cfg); err != nil {
				t.Fatalf("Update with a route to a cluster not defined yet: %v", err)
			}
			c, _ := countingClient(tc.h2c)
			code, _, body := get(t, c, tp.addr, "svc", "/")
			if code != http.StatusServiceUnavailable || !strings.Contains(body, `"later"`) {
				t.Fatalf("route to an undefined cluster: %d %q, want 503 naming it", code, body)
			}
			waitUntil(t, func() bool { return strings.Contains(tp.log.String(), `"flags":"NC"`) })
			cfg.Clusters = append(cfg.Clusters, config.Cluster{Name: "later", Endpoints: []config.Endpoint{{Address: b.addr}}})
			if err := tp.Update(cfg); err != nil {
				t.Fatal(err)
			}
			if code, h, _ := get(t, c, tp.addr, "svc", "/"); code != 200 || h.Get("X-Backend") != "b" {
				t.Fatalf("once the cluster is defined: %d from %q, want 200 from b", code, h.Get("X-Backend"))
			}
		})
	}
}

// TestUpdateMovesFramesConnectionOff: an Update that routes an h2c port
// where the frame forwarder cannot follow (an http1 upstream) refuses the
// next stream on an existing forwarder connection with REFUSED_STREAM and
// GOAWAY; the client retries on a new connection, which net/http serves.
func TestUpdateMovesFramesConnectionOff(t *testing.T) {
	t.Parallel()
	a := startBackend(t, "a", nil)
	b := startBackend(t, "b", nil)
	cfg := twoClusters(t, "a", a.addr, b.addr, "")
	cfg.HTTP2Forwarder = config.H2Frames
	tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	c, dials := countingClient(true)
	if code, h, _ := get(t, c, tp.addr, "svc", "/"); code != 200 || h.Get("X-Proto") != "HTTP/2.0" {
		t.Fatalf("before: %d %q", code, h.Get("X-Proto"))
	}
	served := tp.h2.served.Load()
	cfg2 := twoClusters(t, "b", a.addr, b.addr, "")
	cfg2.HTTP2Forwarder = config.H2Frames
	cfg2.Clusters[1].Protocol = "http1"
	if err := tp.Update(cfg2); err != nil {
		t.Fatal(err)
	}
	code, h, _ := get(t, c, tp.addr, "svc", "/")
	if code != 200 || h.Get("X-Backend") != "b" || h.Get("X-Proto") != "HTTP/1.1" {
		t.Fatalf("after: %d from %q over %q, want 200 from b over HTTP/1.1", code, h.Get("X-Backend"), h.Get("X-Proto"))
	}
	if n := dials.Load(); n != 2 {
		t.Errorf("client opened %d connections, want 2 (the refused stream retried on a new one)", n)
	}
	if n := tp.h2.served.Load(); n != served {
		t.Errorf("the new connection went to the frame forwarder (%d more)", n-served)
	}
}

// TestUpdateShared: UpdateShared keeps what is the same memory as in the
// running configuration — a service keeps its compiled routes (and their
// retry budget), a cluster its state — recompiles a service whose routes
// changed or whose cluster changed, and still refuses a configuration that
// is invalid only through the changed part (an unchanged route naming a
// subset the changed cluster no longer has), keeping the running table.
func TestUpdateShared(t *testing.T) {
	t.Parallel()
	a := startBackend(t, "a", nil)
	b := startBackend(t, "b", nil)
	cfg := mustLoad(t, fmt.Sprintf(`
services:
- {name: one, hosts: [one], routes: [{name: r, retries: {attempts: 1, budget: {ratio: 0.5}}, destinations: [{cluster: a}]}]}
- {name: two, hosts: [two], routes: [{name: r, destinations: [{cluster: a}]}]}
- {name: three, hosts: [three], routes: [{name: r, destinations: [{cluster: b, subset: v1}]}]}
clusters:
- {name: a, endpoints: [{address: %q}]}
- {name: b, endpoints: [{address: %q, labels: {version: v1}}], subsets: [{name: v1, labels: {version: v1}}]}
`, a.addr, b.addr))
	tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	if err := tp.UpdateShared(cfg); err != nil { // the first table was New's: compiled again
		t.Fatal(err)
	}
	c, _ := countingClient(false)
	if code, h, _ := get(t, c, tp.addr, "one", "/"); code != 200 || h.Get("X-Backend") != "a" {
		t.Fatalf("one: %d from %q", code, h.Get("X-Backend"))
	}
	t0 := tp.tab.Load()
	if got := t0.services[0].Routes[0].Budget.Requests(); got != 1 {
		t.Fatalf("retry budget deposits %v, want 1", got)
	}

	// Service two moves to cluster b: a new service list and route list for
	// it, everything else shared.
	next := cfg
	next.Services = append([]config.Service(nil), cfg.Services...)
	next.Services[1].Routes = []config.Route{{Name: "r", Destinations: []config.Destination{{Cluster: "b"}}}}
	if err := tp.UpdateShared(next); err != nil {
		t.Fatal(err)
	}
	t1 := tp.tab.Load()
	for i, kept := range []bool{true, false, true} {
		if got := t1.services[i] == t0.services[i]; got != kept {
			t.Errorf("service %s: compiled service kept %v, want %v", next.Services[i].Name, got, kept)
		}
	}
	if t1.clusters["a"] != t0.clusters["a"] || t1.clusters["b"] != t0.clusters["b"] {
		t.Error("an unchanged cluster was rebuilt")
	}
	if got := t1.services[0].Routes[0].Budget.Requests(); got != 1 {
		t.Errorf("the kept route's retry budget has %v deposits, want 1", got)
	}
	if code, h, _ := get(t, c, tp.addr, "two", "/"); code != 200 || h.Get("X-Backend") != "b" {
		t.Fatalf("two after the update: %d from %q, want 200 from b", code, h.Get("X-Backend"))
	}

	// Cluster b loses subset v1: service three is unchanged, but its route
	// now names a subset that does not exist.
	bad := next
	bad.Clusters = append([]config.Cluster(nil), next.Clusters...)
	bad.Clusters[1].Subsets = nil
	err := tp.UpdateShared(bad)
	if err == nil || !strings.Contains(err.Error(), `services[2].routes[0].destinations[0].subset: "v1" is not a subset of cluster "b"`) {
		t.Fatalf("UpdateShared with a dangling subset: %v", err)
	}
	if tp.tab.Load() != t1 {
		t.Fatal("a refused update replaced the table")
	}

	// A new cluster b with other settings: the services routing to it are
	// compiled again against it, the others kept.
	lr := next
	lr.Clusters = append([]config.Cluster(nil), next.Clusters...)
	lr.Clusters[1].LoadBalancer = config.LBLeastRequest
	if err := tp.UpdateShared(lr); err != nil {
		t.Fatal(err)
	}
	t2 := tp.tab.Load()
	if t2.clusters["b"] == t1.clusters["b"] || t2.clusters["a"] != t1.clusters["a"] {
		t.Fatal("cluster b was not rebuilt, or a was")
	}
	for i, kept := range []bool{true, false, false} {
		if got := t2.services[i] == t1.services[i]; got != kept {
			t.Errorf("after cluster b changed: service %s kept %v, want %v", lr.Services[i].Name, got, kept)
		}
	}
	if d := t2.services[2].Routes[0].Dests[0]; d.Cluster != t2.clusters["b"] {
		t.Error("service three still sends to the retired cluster b")
	}
	if code, h, _ := get(t, c, tp.addr, "three", "/"); code != 200 || h.Get("X-Backend") != "b" {
		t.Fatalf("three: %d from %q", code, h.Get("X-Backend"))
	}
}
