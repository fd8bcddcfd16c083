package xds

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7"
)

// backend is a real HTTP/1.1 + h2c + gRPC server on loopback that answers
// with its name (HTTP body, gRPC header "backend").
type backend struct {
	name string
	addr string
	hits atomic.Int64
}

func startBackend(t testing.TB, name string) *backend {
	t.Helper()
	b := &backend{name: name}
	gs := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		b.hits.Add(1)
		_ = grpc.SetHeader(ctx, metadata.Pairs("backend", name))
		return h(ctx, req)
	}))
	healthpb.RegisterHealthServer(gs, health.NewServer())
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		if r.ProtoMajor == 2 && strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc") {
			gs.ServeHTTP(w, r)
			return
		}
		b.hits.Add(1)
		_, _ = io.Copy(io.Discard, r.Body)
		fmt.Fprint(w, name)
	})
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b.addr = ln.Addr().String()
	hs := &http.Server{Handler: mux, Protocols: new(http.Protocols)}
	hs.Protocols.SetHTTP1(true)
	hs.Protocols.SetUnencryptedHTTP2(true)
	go func() { _ = hs.Serve(ln) }()
	t.Cleanup(func() { _ = hs.Close() })
	return b
}

// proxyUnderTest is the real L7 engine behind a loopback listener whose
// connections all have the service VIP as original destination (what the
// outbound capture gives), configured by a real xDS client.
type proxyUnderTest struct {
	eng    *l7.Engine
	addr   string
	client *Client
	stop   func()
}

// loopbackDial refuses anything but loopback: traffic never leaves here.
func loopbackDial(ctx context.Context, _ l4.Direction, network, addr string) (net.Conn, error) {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil || !ap.Addr().IsLoopback() {
		return nil, fmt.Errorf("test dialer: %s is not a loopback address", addr)
	}
	var d net.Dialer
	return d.DialContext(ctx, network, addr)
}

func startProxy(t testing.TB, o Options, vip string) *proxyUnderTest {
	t.Helper()
	eng, err := l7.New(config.L7{}, l7.Options{AccessLog: io.Discard, Dial: loopbackDial, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	p := &proxyUnderTest{eng: eng}
	o.Engine = EngineApplier(eng)
	if o.Node == nil {
		o.Node = testIdentity.Node()
	}
	if o.BackoffInitial == 0 {
		o.BackoffInitial, o.BackoffMax = 20*time.Millisecond, 200*time.Millisecond
	}
	p.client, err = New(o)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.client.LoadPersisted(); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p.addr = ln.Addr().String()
	dst := netip.MustParseAddrPort(vip)
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(2)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); eng.ServeConn(ctx, c, dst, l4.Outbound) }()
		}
	}()
	go func() { defer wg.Done(); _ = p.client.Run(ctx) }()
	var once sync.Once
	p.stop = func() {
		once.Do(func() {
			ln.Close()
			cancel()
			eng.Close()
			wg.Wait()
		})
	}
	t.Cleanup(p.stop)
	return p
}

// httpClient never retries: every request is a POST with a body (Go's
// transport replays only idempotent requests), one attempt each.
func httpClient() *http.Client {
	return &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64}, Timeout: 5 * time.Second}
}

func post(c *http.Client, proxyAddr, host string) (string, error) {
	req, _ := http.NewRequest(http.MethodPost, "http://"+proxyAddr+"/", bytes.NewReader([]byte("ping")))
	req.Host = host
	resp, err := c.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != 200 {
		return "", fmt.Errorf("status %d: %s (flags %s)", resp.StatusCode, b, resp.Header.Get("x-meshlet-flags"))
	}
	return string(b), nil
}

// split sends n requests and returns the count per backend and failures.
func split(t testing.TB, c *http.Client, addr string, n int) (map[string]int, []error) {
	t.Helper()
	got := map[string]int{}
	var errs []error
	for range n {
		b, err := post(c, addr, "reviews.shop.svc.cluster.local:9080")
		if err != nil {
			errs = append(errs, err)
			continue
		}
		got[b]++
	}
	return got, errs
}

// load runs workers that post until stop is closed, recording every
// outcome with its start time.
type load struct {
	mu      sync.Mutex
	results []result
	wg      sync.WaitGroup
	stop    chan struct{}
}

type result struct {
	start   time.Time
	backend string
	err     error
}

func startLoad(addr string, workers int) *load {
	l := &load{stop: make(chan struct{})}
	for range workers {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			c := httpClient()
			for i := 0; i < 20000; i++ { // bounded
				select {
				case <-l.stop:
					return
				default:
				}
				start := time.Now()
				b, err := post(c, addr, "reviews.shop.svc.cluster.local:9080")
				l.mu.Lock()
				l.results = append(l.results, result{start, b, err})
				l.mu.Unlock()
			}
		}()
	}
	return l
}

// until keeps the load running until at least n requests started at or
// after t0 have finished (or 30 s passed, which fails the test): a count,
// not a time window, so a slow machine (-race, two shared cores) gets the
// same number of samples as a fast one.
func (l *load) until(t *testing.T, t0 time.Time, n int) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d requests after %s", n, t0.Format("15:04:05.000")), 30*time.Second, func() bool {
		l.mu.Lock()
		defer l.mu.Unlock()
		c := 0
		for _, r := range l.results {
			if !r.start.Before(t0) {
				c++
			}
		}
		return c >= n
	})
}

func (l *load) finish() []result {
	close(l.stop)
	l.wg.Wait()
	return l.results
}

func failures(rs []result) []error {
	var errs []error
	for _, r := range rs {
		if r.err != nil {
			errs = append(errs, r.err)
		}
	}
	return errs
}

func share(rs []result, after time.Time, backend string) (float64, int) {
	n, k := 0, 0
	for _, r := range rs {
		if r.err == nil && r.start.After(after) {
			n++
			if r.backend == backend {
				k++
			}
		}
	}
	if n == 0 {
		return 0, 0
	}
	return float64(k) / float64(n), n
}

// canary is reviews with v1 and v2 served by real backends.
func canary(t testing.TB, w1, w2 uint32) (mesh, *backend, *backend) {
	v1, v2 := startBackend(t, "v1"), startBackend(t, "v2")
	m := reviews
	m.Subsets = map[string][]string{"v1": {v1.addr}, "v2": {v2.addr}}
	m.Weights = map[string]uint32{"v1": w1, "v2": w2}
	return m, v1, v2
}

func waitApplied(t testing.TB, c *Client, what string, cond func(Status) bool) {
	t.Helper()
	waitFor(t, what, 10*time.Second, func() bool { return cond(c.Status()) })
}

// TestTrafficSplit: real HTTP/1.1 and gRPC through the engine configured
// over ADS (delta and SotW) split 90/10 between v1 and v2.
func TestTrafficSplit(t *testing.T) {
	for _, p := range []Protocol{Delta, SotW} {
		t.Run(string(p), func(t *testing.T) {
			m, _, _ := canary(t, 90, 10)
			srv := startCP(t, "")
			srv.Set(t, "1", m.Resources())
			px := startProxy(t, Options{Address: srv.Addr, Protocol: p}, "10.96.0.10:9080")
			if err := px.client.WaitReady(context.Background(), 10*time.Second); err != nil {
				t.Fatal(err)
			}
			got, errs := split(t, httpClient(), px.addr, 1000)
			if len(errs) > 0 {
				t.Fatalf("%d failed, first: %v", len(errs), errs[0])
			}
			if v2 := got["v2"]; v2 < 60 || v2 > 140 {
				t.Errorf("HTTP split %v; want v2 ≈ 100 of 1000", got)
			}
			// gRPC (h2c through the frame forwarder), 400 calls.
			cc, err := grpc.NewClient(px.addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
				grpc.WithAuthority("reviews.shop.svc.cluster.local:9080"))
			if err != nil {
				t.Fatal(err)
			}
			defer cc.Close()
			hc := healthpb.NewHealthClient(cc)
			gs := map[string]int{}
			for range 400 {
				var md metadata.MD
				if _, err := hc.Check(context.Background(), &healthpb.HealthCheckRequest{}, grpc.Header(&md)); err != nil {
					t.Fatalf("gRPC call: %v", err)
				}
				gs[strings.Join(md.Get("backend"), "")]++
			}
			if v2 := gs["v2"]; v2 < 16 || v2 > 72 {
				t.Errorf("gRPC split %v; want v2 ≈ 40 of 400", gs)
			}
		})
	}
}

// TestWeightChangeUnderLoad: the VirtualService's weights change under
// constant load from clients that never retry; no request fails and the
// requests that start after the client applied the update follow the new
// split. The time from the snapshot to the update serving is logged (the
// benchmark measures it).
func TestWeightChangeUnderLoad(t *testing.T) {
	m, _, _ := canary(t, 90, 10)
	srv := startCP(t, "")
	srv.Set(t, "1", m.Resources())
	px := startProxy(t, Options{Address: srv.Addr}, "10.96.0.10:9080")
	if err := px.client.WaitReady(context.Background(), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	l := startLoad(px.addr, 8)
	time.Sleep(300 * time.Millisecond)
	m.Weights = map[string]uint32{"v1": 10, "v2": 90}
	pushed := time.Now()
	srv.Set(t, "2", m.Resources())
	waitApplied(t, px.client, "version 2 of the routes", func(s Status) bool { return s.Versions["rds"] == "2" })
	applied := time.Now()
	t.Logf("snapshot set → route update serving: %v", applied.Sub(pushed))
	l.until(t, applied, 300)
	rs := l.finish()
	if errs := failures(rs); len(errs) > 0 {
		t.Fatalf("%d of %d requests failed, first: %v", len(errs), len(rs), errs[0])
	}
	after, n := share(rs, applied, "v2")
	if n < 200 || after < 0.8 || after > 0.97 {
		t.Errorf("v2 share of %d requests after the update: %.2f; want ≈ 0.90", n, after)
	}
	t.Logf("%d requests, none failed; v2 share after the update %.3f over %d", len(rs), after, n)
}

// TestEndpointsScaleUnderLoad: v1 scales from one endpoint to three and
// back to one under load (EDS only: the engine's endpoint path); no request
// fails, and every endpoint took traffic while it was in the set.
func TestEndpointsScaleUnderLoad(t *testing.T) {
	for _, p := range []Protocol{Delta, SotW} {
		t.Run(string(p), func(t *testing.T) {
			m, v1, _ := canary(t, 100, 0)
			delete(m.Weights, "v2")
			delete(m.Subsets, "v2")
			extra := []*backend{startBackend(t, "v1"), startBackend(t, "v1")}
			srv := startCP(t, "")
			srv.Set(t, "1", m.Resources())
			px := startProxy(t, Options{Address: srv.Addr, Protocol: p}, "10.96.0.10:9080")
			if err := px.client.WaitReady(context.Background(), 10*time.Second); err != nil {
				t.Fatal(err)
			}
			l := startLoad(px.addr, 8)
			time.Sleep(200 * time.Millisecond)
			m.Subsets = map[string][]string{"v1": {v1.addr, extra[0].addr, extra[1].addr}}
			srv.Set(t, "2", m.Resources())
			waitFor(t, "three endpoints", 5*time.Second, func() bool { return edsVersions(px.client) == 3 })
			waitFor(t, "traffic on the new endpoints", 5*time.Second, func() bool { return extra[0].hits.Load() > 20 && extra[1].hits.Load() > 20 })
			m.Subsets = map[string][]string{"v1": {extra[1].addr}}
			srv.Set(t, "3", m.Resources())
			waitFor(t, "one endpoint", 5*time.Second, func() bool { return edsVersions(px.client) == 1 })
			time.Sleep(300 * time.Millisecond)
			h0, h1 := v1.hits.Load(), extra[0].hits.Load()
			time.Sleep(200 * time.Millisecond)
			rs := l.finish()
			if errs := failures(rs); len(errs) > 0 {
				t.Fatalf("%d of %d requests failed, first: %v", len(errs), len(rs), errs[0])
			}
			if v1.hits.Load() != h0 || extra[0].hits.Load() != h1 {
				t.Errorf("removed endpoints still take new requests")
			}
			t.Logf("%d requests, none failed", len(rs))
		})
	}
}

// edsVersions counts the endpoints of the v1 cluster the client holds.
func edsVersions(c *Client) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	e := c.res[EndpointType].entries[reviews.ClusterName("v1")]
	if e == nil {
		return 0
	}
	return len(e.endpoints)
}

// TestControlPlaneGone: the control plane stops under load; traffic goes
// on with the last configuration, nothing fails, and the client says it is
// disconnected.
func TestControlPlaneGone(t *testing.T) {
	m, _, _ := canary(t, 90, 10)
	srv := startCP(t, "")
	srv.Set(t, "1", m.Resources())
	px := startProxy(t, Options{Address: srv.Addr}, "10.96.0.10:9080")
	if err := px.client.WaitReady(context.Background(), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	l := startLoad(px.addr, 4)
	time.Sleep(200 * time.Millisecond)
	srv.Stop()
	waitApplied(t, px.client, "disconnected", func(s Status) bool { return !s.Connected })
	stopped := time.Now()
	l.until(t, stopped, 200)
	rs := l.finish()
	if errs := failures(rs); len(errs) > 0 {
		t.Fatalf("%d of %d requests failed, first: %v", len(errs), len(rs), errs[0])
	}
	if v2, n := share(rs, stopped, "v2"); n < 100 || v2 < 0.04 || v2 > 0.2 {
		t.Errorf("after the control plane stopped: %d requests, v2 share %.2f", n, v2)
	}
	if px.client.Ready() != nil {
		t.Errorf("not ready after losing the control plane: %v", px.client.Ready())
	}
}

// TestRestartWithControlPlaneDown: a new generation (new engine, new
// client) starting while the control plane is unreachable serves the
// persisted configuration at once.
func TestRestartWithControlPlaneDown(t *testing.T) {
	state := filepath.Join(t.TempDir(), "xds-state")
	m, _, _ := canary(t, 90, 10)
	srv := startCP(t, "")
	srv.Set(t, "1", m.Resources())
	px := startProxy(t, Options{Address: srv.Addr, StateFile: state}, "10.96.0.10:9080")
	if err := px.client.WaitReady(context.Background(), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	px.stop()
	srv.Stop()

	px2 := startProxy(t, Options{Address: srv.Addr, StateFile: state}, "10.96.0.10:9080")
	if err := px2.client.Ready(); err != nil {
		t.Fatalf("not ready from the persisted config: %v", err)
	}
	if s := px2.client.Status(); s.Source != SourcePersisted || s.Connected {
		t.Fatalf("status %+v", s)
	}
	got, errs := split(t, httpClient(), px2.addr, 500)
	if len(errs) > 0 {
		t.Fatalf("%d failed, first: %v", len(errs), errs[0])
	}
	if v2 := got["v2"]; v2 < 25 || v2 > 80 {
		t.Errorf("split from the persisted config %v; want v2 ≈ 50 of 500", got)
	}
}

// TestEngineNACK: a resource the translation accepts but the engine
// refuses (an unknown retry condition) is NACKed with the engine's message
// naming the field, and the old configuration keeps serving.
func TestEngineNACK(t *testing.T) {
	m, _, _ := canary(t, 90, 10)
	srv := startCP(t, "")
	srv.Set(t, "1", m.Resources())
	px := startProxy(t, Options{Address: srv.Addr}, "10.96.0.10:9080")
	if err := px.client.WaitReady(context.Background(), 10*time.Second); err != nil {
		t.Fatal(err)
	}
	bad := m.Resources()
	bad[resource.RouteType] = []types.Resource{withRetryOn(bad[resource.RouteType][0], "sometimes")}
	srv.Set(t, "2", bad)
	waitFor(t, "the NACK at the server", 5*time.Second, func() bool {
		for _, msg := range srv.NACKs() {
			if strings.Contains(msg, "RouteConfiguration update rejected by the engine") && strings.Contains(msg, `unknown condition "sometimes"`) {
				return true
			}
		}
		return false
	})
	got, errs := split(t, httpClient(), px.addr, 500)
	if len(errs) > 0 {
		t.Fatalf("%d failed after the NACK, first: %v", len(errs), errs[0])
	}
	if v2 := got["v2"]; v2 < 25 || v2 > 80 {
		t.Errorf("split after the NACK %v; want the old 90/10", got)
	}
	if s := px.client.Status(); !strings.Contains(s.LastNACK["rds"].Message, "sometimes") {
		t.Errorf("status lastNack %+v", s.LastNACK)
	}
}

func withRetryOn(r types.Resource, on string) types.Resource {
	rc := proto.Clone(r.(proto.Message)).(*routev3.RouteConfiguration)
	rc.VirtualHosts[0].Routes[0].GetRoute().RetryPolicy = &routev3.RetryPolicy{RetryOn: on, NumRetries: wrapperspb.UInt32(1)}
	return rc
}
