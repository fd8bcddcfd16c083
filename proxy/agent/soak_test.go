package agent_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math"
	"net"
	"net/http"
	"os"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/agent"
)

// load pushes constant traffic through addr (a capture listener forwarding
// to a serveBackend backend) with clients that never retry: every attempt
// counts, a failed one is a failure. Keep-alive clients POST on one
// connection for the whole run (the backend writes head and body apart);
// new-connection clients POST with Connection: close; long-lived clients
// hold one connection each for the whole run: an echo stream, a stream of
// events, and a database-like exchange idle between queries. Every dial is
// counted, so a reconnect shows.
type load struct {
	addr                       string
	dial                       func(ctx context.Context, network, addr string) (net.Conn, error)
	idle                       time.Duration // between database queries
	stop                       chan struct{}
	wg                         sync.WaitGroup
	ok, streams, fail, opened  atomic.Int64
	events, queries, longLived atomic.Int64
	streamClients              int
	mu                         sync.Mutex
	errs                       []string
}

func startLoad(addr string, keepAlive, newConn, streams int) *load {
	return startLoadVia((&net.Dialer{}).DialContext, addr, keepAlive, newConn, streams)
}

// startLoadVia is startLoad with a dialer (for example one inside a
// network namespace). streams long-lived clients alternate echo, events and
// database.
func startLoadVia(dial func(ctx context.Context, network, addr string) (net.Conn, error), addr string, keepAlive, newConn, streams int) *load {
	l := &load{addr: addr, dial: dial, stop: make(chan struct{}), idle: 200 * time.Millisecond}
	for i := 0; i < keepAlive; i++ {
		l.long(l.keepAlive)
	}
	for i := 0; i < newConn; i++ {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			for !l.stopped() {
				if err := l.oneShot(); err != nil {
					l.failed(err)
				}
			}
		}()
	}
	l.streamClients = streams
	kinds := []func(net.Conn) error{l.echoStream, l.eventStream, l.database}
	for i := 0; i < streams; i++ {
		l.long(kinds[i%len(kinds)])
	}
	return l
}

func (l *load) stopped() bool {
	select {
	case <-l.stop:
		return true
	default:
		return false
	}
}

func (l *load) failed(err error) {
	l.fail.Add(1)
	l.mu.Lock()
	if len(l.errs) < 20 {
		l.errs = append(l.errs, err.Error())
	}
	l.mu.Unlock()
}

func (l *load) connect() (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := l.dial(ctx, "tcp", l.addr)
	if err != nil {
		return nil, fmt.Errorf("dial: %w", err)
	}
	l.opened.Add(1)
	return c, nil
}

// long runs fn on one connection for the whole load; the connection must
// survive every hot restart.
func (l *load) long(fn func(net.Conn) error) {
	l.wg.Add(1)
	l.longLived.Add(1)
	go func() {
		defer l.wg.Done()
		c, err := l.connect()
		if err != nil {
			l.failed(err)
			return
		}
		defer c.Close()
		if err := fn(c); err != nil {
			l.failed(err)
		}
	}()
}

func (l *load) keepAlive(c net.Conn) error {
	br := bufio.NewReader(c)
	for i := 0; !l.stopped(); i++ {
		body := bytes.Repeat([]byte{byte('a' + i%26)}, 64+(i*97)%4000)
		if err := proctest.Post(c, br, body, false); err != nil {
			return fmt.Errorf("keep-alive request %d: %w", i, err)
		}
		l.ok.Add(1)
		time.Sleep(2 * time.Millisecond)
	}
	return nil
}

func (l *load) oneShot() error {
	c, err := l.connect()
	if err != nil {
		return err
	}
	defer c.Close()
	br := bufio.NewReader(c)
	if err := proctest.Post(c, br, []byte("one shot"), true); err != nil {
		return fmt.Errorf("new-connection request: %w", err)
	}
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		return fmt.Errorf("new-connection end: %d bytes, %v", len(rest), err)
	}
	l.ok.Add(1)
	return nil
}

// echoStream echoes 1 KiB chunks every 20ms, then half-closes.
func (l *load) echoStream(c net.Conn) error {
	br := bufio.NewReader(c)
	chunk := bytes.Repeat([]byte("S"), 1024)
	buf := make([]byte, len(chunk))
	for i := 0; !l.stopped(); i++ {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write(chunk); err != nil {
			return fmt.Errorf("stream write %d: %w", i, err)
		}
		if _, err := io.ReadFull(br, buf); err != nil {
			return fmt.Errorf("stream read %d: %w", i, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = c.(*net.TCPConn).CloseWrite()
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		return fmt.Errorf("stream end: %d bytes, %w", len(rest), err)
	}
	l.streams.Add(1)
	return nil
}

// eventStream reads numbered events: each exactly once, in order.
func (l *load) eventStream(c net.Conn) error {
	if _, err := c.Write([]byte("E")); err != nil {
		return err
	}
	br := bufio.NewReader(c)
	for i := 0; !l.stopped(); i++ {
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		line, err := br.ReadString('\n')
		if err == nil {
			_, err = br.ReadString('\n')
		}
		if err != nil || line != fmt.Sprintf("data: %d\n", i) {
			return fmt.Errorf("event %d: %q, %v", i, line, err)
		}
		l.events.Add(1)
	}
	l.streams.Add(1)
	return nil
}

// database sends a query, reads the answer (two writes), and idles.
func (l *load) database(c net.Conn) error {
	br := bufio.NewReader(c)
	for i := 0; !l.stopped(); i++ {
		q := fmt.Sprintf("DB SELECT %d FROM t\n", i) // 'D' picks the protocol
		_ = c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(c, q); err != nil {
			return fmt.Errorf("query %d: %w", i, err)
		}
		head, err := br.ReadString('\n')
		var rows string
		if err == nil {
			rows, err = br.ReadString('\n')
		}
		if err != nil || head != fmt.Sprintf("ROWS %d\n", len(q)) || rows != q {
			return fmt.Errorf("query %d: %q %q, %v", i, head, rows, err)
		}
		l.queries.Add(1)
		select {
		case <-l.stop:
		case <-time.After(l.idle):
		}
	}
	l.streams.Add(1)
	return nil
}

func (l *load) finish(t testing.TB) {
	t.Helper()
	close(l.stop)
	l.wg.Wait()
	t.Logf("load: %d requests, %d events, %d queries, %d long-lived streams completed, %d connections opened, %d failures",
		l.ok.Load(), l.events.Load(), l.queries.Load(), l.streams.Load(), l.opened.Load(), l.fail.Load())
	if n := l.fail.Load(); n != 0 {
		t.Errorf("%d failures under load, first: %q", n, l.errs)
	}
	if done := l.streams.Load(); done != int64(l.streamClients) {
		t.Errorf("%d of %d long-lived streams completed", done, l.streamClients)
	}
}

// concurrentReloads asks for three hot restarts at once under the load:
// the first starts a generation, the ones that arrive while two
// generations live (or one starts) wait and coalesce into one more, so
// they end two or three generations later (never more than two live at
// once: the soak's watcher checks it), and every request is answered.
func (p *proc) concurrentReloads(t *testing.T) {
	t.Helper()
	gen := p.info(t).ActiveGeneration
	res := make([]agent.ReloadResult, 3)
	var wg sync.WaitGroup
	for k := range res {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := http.Post("http://"+p.st+"/reload", "", nil)
			if err != nil {
				res[k].Error = err.Error()
				return
			}
			defer resp.Body.Close()
			if err := json.NewDecoder(resp.Body).Decode(&res[k]); err != nil {
				res[k].Error = err.Error()
			}
		}()
	}
	wg.Wait()
	top := 0
	for _, r := range res {
		if r.Error != "" {
			t.Errorf("concurrent reload: %s", r.Error)
		}
		top = max(top, r.Generation)
	}
	if top < gen+2 || top > gen+3 {
		t.Errorf("three concurrent reloads from generation %d answered %+v: want them coalesced into two or three restarts", gen, res)
	}
	p.waitInfo(t, "the coalesced restarts complete", func(i agent.Info) bool {
		return i.ActiveGeneration == top && len(i.Generations) == 1
	})
}

// restartTimes collects, by the way each hot restart was asked for, how
// long it took as the agent's /server_info shows it: from the request until
// a newer generation is active (it reported ready: it accepts on the shared
// listeners, and the old one has been told to hand over), and until the one
// it replaced has gone (every connection handed over).
type restartTimes struct {
	kinds       []string
	ready, done map[string][]time.Duration
}

func newRestartTimes() *restartTimes {
	return &restartTimes{ready: map[string][]time.Duration{}, done: map[string][]time.Duration{}}
}

// observe polls /server_info after a restart requested at t0 (by how, while
// generation gen was active) until a newer generation is active and runs
// alone, then waits out the rest of pace.
func (rt *restartTimes) observe(t *testing.T, p *proc, how string, gen int, t0 time.Time, pace time.Duration) {
	t.Helper()
	if _, ok := rt.ready[how]; !ok {
		rt.kinds = append(rt.kinds, how)
	}
	ready := false
	for deadline := t0.Add(20 * time.Second); ; time.Sleep(2 * time.Millisecond) {
		i := p.info(t)
		took := time.Since(t0)
		if !ready && i.ActiveGeneration > gen {
			ready = true
			rt.ready[how] = append(rt.ready[how], took)
		}
		if ready && len(i.Generations) == 1 {
			rt.done[how] = append(rt.done[how], took)
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("%s while generation %d was active: not complete within 20 s: %+v", how, gen, i)
			break
		}
	}
	time.Sleep(time.Until(t0.Add(pace)))
}

// report logs the distributions (nearest-rank percentiles), by trigger and
// over all restarts.
func (rt *restartTimes) report(t *testing.T) {
	t.Helper()
	dist := func(d []time.Duration) string {
		if len(d) == 0 {
			return "-"
		}
		d = slices.Clone(d)
		slices.Sort(d)
		q := func(f float64) float64 {
			return float64(d[max(0, int(math.Ceil(f*float64(len(d))))-1)]) / float64(time.Millisecond)
		}
		return fmt.Sprintf("p50 %.1f / p90 %.1f / max %.1f ms", q(0.5), q(0.9), q(1))
	}
	var allReady, allDone []time.Duration
	for _, k := range rt.kinds {
		allReady, allDone = append(allReady, rt.ready[k]...), append(allDone, rt.done[k]...)
		t.Logf("restart timing, %s (%d): request → new generation serving %s; → old generation gone %s", k, len(rt.ready[k]), dist(rt.ready[k]), dist(rt.done[k]))
	}
	t.Logf("restart timing, all (%d): request → new generation serving %s; → old generation gone %s", len(allReady), dist(allReady), dist(allDone))
}

// soakRestarts is the number of hot restarts in the soaks:
// MESHLET_SOAK_RESTARTS, or 9 (the benchmark run uses 100).
func soakRestarts(t *testing.T) int {
	if v := os.Getenv("MESHLET_SOAK_RESTARTS"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("MESHLET_SOAK_RESTARTS: invalid value %q", v)
		}
		return n
	}
	return 9
}

// TestHotRestartSoak: constant load through the outbound listener —
// keep-alive and new-connection POSTs answered in two writes, an echo
// stream, an event stream and a database-like connection idle between
// queries, by clients that never retry — while the configuration changes N
// times by each route (POST /reload, SIGHUP, file change), with one bad
// config in the middle. Zero failures; every long-lived connection survives
// every restart (connections opened = connections the backend accepted =
// the proxy's connections counter, which carries across generations);
// never more than two generations.
func TestHotRestartSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("soak: skipped under -short")
	}
	backend := httpBackend(t)
	p := startAgent(t, backend, "--drain-duration=1s")
	before := p.metric(t, `meshlet_proxy_connections_total{direction="outbound"}`)
	l := startLoad(p.outbound, 4, 2, 6)

	var maxGens atomic.Int64
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		for {
			select {
			case <-l.stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			if n := int64(len(p.info(t).Generations)); n > maxGens.Load() {
				maxGens.Store(n)
			}
		}
	}()

	time.Sleep(300 * time.Millisecond)
	n := soakRestarts(t)
	rt := newRestartTimes()
	for i := 0; i < n; i++ {
		gen, t0 := p.info(t).ActiveGeneration, time.Now()
		how := [...]string{"POST /reload", "SIGHUP", "file change"}[i%3]
		switch i % 3 {
		case 0:
			if r := p.reload(t); r.Error != "" {
				t.Fatalf("reload %d: %s", i, r.Error)
			}
		case 1:
			if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
		case 2:
			if err := os.WriteFile(p.configPath, fmt.Appendf(nil, goodConfig, 11+i), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		rt.observe(t, p, how, gen, t0, 300*time.Millisecond)
		if i == 6 {
			p.concurrentReloads(t)
		}
		if i == 4 {
			// A bad config mid-soak: rejected, the generation keeps serving.
			if err := os.WriteFile(p.configPath, []byte("apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\ninbound:\n  maxConnections: -1\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			time.Sleep(400 * time.Millisecond)
			if r := p.reload(t); r.Error == "" {
				t.Errorf("bad config reload succeeded")
			}
			if err := os.WriteFile(p.configPath, fmt.Appendf(nil, goodConfig, 3), 0o644); err != nil {
				t.Fatal(err)
			}
			// The good config back on disk restarts once more (the watch);
			// the next request is timed from a settled agent.
			p.waitActiveHash(t, "the config written back", configHash(t, fmt.Appendf(nil, goodConfig, 3)))
		}
	}
	time.Sleep(500 * time.Millisecond)
	l.finish(t)
	<-watchDone
	rt.report(t)

	info := p.info(t)
	t.Logf("agent: %+v", info)
	// Reloads arriving while two generations live coalesce, so fewer than
	// n+2 generations may have run.
	if info.ActiveGeneration < n/2 {
		t.Errorf("active generation %d after %d reloads", info.ActiveGeneration, n)
	}
	if m := maxGens.Load(); m > 2 {
		t.Errorf("saw %d live generations, want at most 2", m)
	}
	opened := l.opened.Load()
	if got := acceptedBy(backend); got != opened {
		t.Errorf("backend accepted %d connections, clients opened %d (a connection was re-made behind the client)", got, opened)
	}
	after := p.metric(t, `meshlet_proxy_connections_total{direction="outbound"}`)
	if after-before != float64(opened) {
		t.Errorf("connections counter went from %v to %v across generations; clients opened %d", before, after, opened)
	}
	for name, want := range map[string]float64{
		`meshlet_proxy_drain_closed_connections_total{direction="outbound"}`:  0,
		`meshlet_proxy_errors_total{direction="outbound",kind="handover"}`:    0,
		`meshlet_proxy_errors_total{direction="any",kind="handover_refused"}`: 0,
	} {
		if v := p.metric(t, name); v != want {
			t.Errorf("%s = %v, want %v", name, v, want)
		}
	}
	if v := p.metric(t, `meshlet_proxy_handed_over_connections_total{direction="outbound"}`); v < float64(info.ActiveGeneration-1) {
		t.Errorf("handed-over connections = %v over %d generations", v, info.ActiveGeneration)
	}
	if v := p.metric(t, `meshlet_agent_reloads_total{result="failure"}`); v < 1 {
		t.Errorf("reload failures = %v, want ≥ 1", v)
	}
	if l.ok.Load() < 100 || l.events.Load() == 0 || l.queries.Load() == 0 {
		t.Errorf("too little load went through: %d requests, %d events, %d queries", l.ok.Load(), l.events.Load(), l.queries.Load())
	}
}

// soakL7Config sends HTTP for Host backend through the L7 engine (routed to
// a cluster of the backend) and relays every other protocol at L4: the
// backend's port is not declared, so each connection's protocol is
// detected (the event stream's client sends one byte and waits: detection
// takes it for TCP once the timeout passed). timeout only makes two configs
// differ.
func soakL7Config(backend string, timeout int) []byte {
	return fmt.Appendf(nil, `apiVersion: meshlet.io/v1alpha1
kind: ProxyConfig
outbound:
  connectTimeout: %ds
l7:
  detection: {timeout: 1s}
  services:
  - name: backend
    hosts: [backend]
    routes: [{name: r, destinations: [{cluster: backend}]}]
  clusters:
  - {name: backend, endpoints: [{address: %q}]}
`, timeout, backend)
}

// metricSum is the sum of every series of family name in the agent's
// exposition whose labels contain match (0 when there is none).
func (p *proc) metricSum(t *testing.T, name, match string) float64 {
	t.Helper()
	_, body := proctest.HTTPGet("http://" + p.st + "/stats/prometheus")
	var sum float64
	for _, m := range regexp.MustCompile(`(?m)^`+regexp.QuoteMeta(name)+`(\{[^}]*\})? (\S+)$`).FindAllStringSubmatch(body, -1) {
		if strings.Contains(m[1], match) {
			v, _ := strconv.ParseFloat(m[2], 64)
			sum += v
		}
	}
	return sum
}

// TestHotRestartSoakL7 is TestHotRestartSoak with the L7 engine serving the
// HTTP load: keep-alive and new-connection POSTs (answered in two writes)
// go through the HTTP/1.1 codec, the echo, event and database streams are
// detected as TCP and relayed. Every restart moves the codec's keep-alive
// connections to the next generation between two requests and the relays
// as they are: zero failures, no connection opened but by the clients, no
// connection left behind or ended by a drain, and the L7 request counter
// equals the requests answered across all generations.
func TestHotRestartSoakL7(t *testing.T) {
	if testing.Short() {
		t.Skip("soak: skipped under -short")
	}
	backend := httpBackend(t)
	p := startAgent(t, backend, "--drain-duration=2s")
	writeFile(t, p.configPath, soakL7Config(backend, 10))
	if r := p.reload(t); r.Error != "" {
		t.Fatalf("reload to the L7 config: %s", r.Error)
	}
	p.waitActiveHash(t, "L7 config", configHash(t, soakL7Config(backend, 10)))
	before := p.metric(t, `meshlet_proxy_connections_total{direction="outbound"}`)
	l7Before := p.metricSum(t, "meshlet_l7_requests_total", `code_class="2xx"`)
	l := startLoad(p.outbound, 4, 2, 6)
	time.Sleep(300 * time.Millisecond)
	n := soakRestarts(t)
	rt := newRestartTimes()
	for i := 0; i < n; i++ {
		gen, t0 := p.info(t).ActiveGeneration, time.Now()
		// The file changes too: the watch's reload finds the new
		// generation already running it (or coalesces and then does).
		writeFile(t, p.configPath, soakL7Config(backend, 11+i))
		how := "POST /reload"
		if i%2 == 0 {
			if r := p.reload(t); r.Error != "" {
				t.Fatalf("reload %d: %s", i, r.Error)
			}
		} else {
			how = "SIGHUP"
			if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
		}
		rt.observe(t, p, how, gen, t0, 300*time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	l.finish(t)
	rt.report(t)
	info := p.waitActiveHash(t, "the last config", configHash(t, soakL7Config(backend, 10+n)))
	t.Logf("agent: %+v", info)

	opened := l.opened.Load()
	if d := p.metric(t, `meshlet_proxy_connections_total{direction="outbound"}`) - before; d != float64(opened) {
		t.Errorf("the proxy accepted %v connections; clients opened %d", d, opened)
	}
	if d := p.metricSum(t, "meshlet_l7_requests_total", `code_class="2xx"`) - l7Before; d != float64(l.ok.Load()) {
		_, body := proctest.HTTPGet("http://" + p.st + "/stats/prometheus")
		t.Errorf("meshlet_l7_requests_total 2xx grew by %v; the clients got %d answers:\n%s", d, l.ok.Load(), body)
	}
	for name, want := range map[string]float64{
		`meshlet_proxy_drain_closed_connections_total{direction="outbound"}`:  0,
		`meshlet_proxy_errors_total{direction="outbound",kind="handover"}`:    0,
		`meshlet_proxy_errors_total{direction="any",kind="handover_refused"}`: 0,
	} {
		if v := p.metric(t, name); v != want {
			t.Errorf("%s = %v, want %v", name, v, want)
		}
	}
	// Only the event streams wait for the detection timeout; an HTTP client
	// taken for TCP would have been answered past the engine.
	if v, want := p.metricSum(t, "meshlet_proxy_protocol_detection_total", `reason="timeout"`), float64(l.streamClients/3); v != want {
		t.Errorf("detection timeouts = %v, want %v (the event streams)", v, want)
	}
	if v := p.metricSum(t, "meshlet_l7_drain_not_moved_total", ""); v != 0 {
		t.Errorf("meshlet_l7_drain_not_moved_total = %v, want 0", v)
	}
	// Each restart under load (the first generation's config was not L7)
	// moves at least the 4 keep-alive and 6 stream connections.
	moved := p.metric(t, `meshlet_proxy_handed_over_connections_total{direction="outbound"}`)
	if restarts := info.ActiveGeneration - 2; moved < float64(10*restarts) {
		t.Errorf("handed-over connections = %v over %d restarts; want at least %d", moved, restarts, 10*restarts)
	}
	if l.ok.Load() < 100 || l.events.Load() == 0 || l.queries.Load() == 0 {
		t.Errorf("too little load went through: %d requests, %d events, %d queries", l.ok.Load(), l.events.Load(), l.queries.Load())
	}
}

// TestHotRestartLongLived: through the agent in its default (L4) mode, a
// database-like connection idle 10 s between queries (the server spoke
// last) and an HTTP server-sent-events stream open for at least 30 s, while
// the proxy hot-restarts every 2.5 s: both connections survive every
// restart (each is the only connection its client opens, and the proxy and
// the backend see exactly those two), every event arrives once and in
// order, and every query is answered.
//
// Each restart is complete — the new generation active, the old one gone —
// before the next, and the clients keep their connections until the last
// one is: so every restart must move exactly both connections (a restart
// still under way when a client closed would move fewer, which says nothing
// about the proxy), and after every restart the event stream goes on
// through the new generation. It runs for about 35 s, mostly idle, beside
// the other tests.
func TestHotRestartLongLived(t *testing.T) {
	if testing.Short() {
		t.Skip("long-lived connections across restarts: 30 s, skipped under -short")
	}
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var acceptedConns atomic.Int64
	proctest.ServeBackend(t, ln, 1, func(first []byte, c *net.TCPConn, br *bufio.Reader) bool {
		acceptedConns.Add(1)
		defer c.Close()
		switch first[0] {
		case 'D':
			serveDatabase(c, br)
		case 'G': // GET /events: an event every 100 ms, each its own chunk
			if _, err := http.ReadRequest(br); err != nil {
				return true
			}
			if _, err := io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"); err != nil {
				return true
			}
			for i := 0; ; i++ {
				ev := fmt.Sprintf("data: %d\n\n", i)
				if _, err := fmt.Fprintf(c, "%x\r\n%s\r\n", len(ev), ev); err != nil {
					return true
				}
				time.Sleep(100 * time.Millisecond)
			}
		}
		return true
	})
	backend := ln.Addr().String()
	p := startAgent(t, backend, "--drain-duration=1s")
	before := p.metric(t, `meshlet_proxy_connections_total{direction="outbound"}`)
	counter := func(name string) float64 {
		return p.metricOr(`meshlet_proxy_`+name+`_connections_total{direction="outbound"}`, 0)
	}
	movedBefore, adoptedBefore := counter("handed_over"), counter("adopted")

	const runFor = 30 * time.Second
	start := time.Now()
	// stop is closed once runFor has passed and the last restart is
	// complete: the clients end then, not before.
	stop := make(chan struct{})
	stopped := func() bool {
		select {
		case <-stop:
			return true
		default:
			return false
		}
	}
	errs := make(chan error, 2)
	var queries, events atomic.Int64
	go func() { // database: a query now, every 10 s and once more at the end
		c, err := net.Dial("tcp", p.outbound)
		if err != nil {
			errs <- err
			return
		}
		defer c.Close()
		br := bufio.NewReader(c)
		for i := 0; ; i++ {
			last := stopped()
			q := fmt.Sprintf("DB SELECT %d FROM t\n", i)
			_ = c.SetDeadline(time.Now().Add(15 * time.Second))
			if _, err := io.WriteString(c, q); err != nil {
				errs <- fmt.Errorf("query %d: %w", i, err)
				return
			}
			head, err := br.ReadString('\n')
			var rows string
			if err == nil {
				rows, err = br.ReadString('\n')
			}
			if err != nil || head != fmt.Sprintf("ROWS %d\n", len(q)) || rows != q {
				errs <- fmt.Errorf("query %d after %v idle: %q %q, %v", i, 10*time.Second, head, rows, err)
				return
			}
			queries.Add(1)
			if last {
				errs <- nil
				return
			}
			select {
			case <-stop:
			case <-time.After(10 * time.Second):
			}
		}
	}()
	go func() { // server-sent events until the end
		c, err := net.Dial("tcp", p.outbound)
		if err != nil {
			errs <- err
			return
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(15 * time.Second))
		if _, err := io.WriteString(c, "GET /events HTTP/1.1\r\nHost: backend\r\nAccept: text/event-stream\r\n\r\n"); err != nil {
			errs <- err
			return
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			errs <- fmt.Errorf("events response: %w", err)
			return
		}
		body := bufio.NewReader(resp.Body)
		for i := 0; !stopped(); i++ {
			_ = c.SetDeadline(time.Now().Add(15 * time.Second))
			line, err := body.ReadString('\n')
			if err == nil {
				_, err = body.ReadString('\n')
			}
			if err != nil || line != fmt.Sprintf("data: %d\n", i) {
				errs <- fmt.Errorf("event %d: %q, %v", i, line, err)
				return
			}
			events.Add(1)
		}
		errs <- nil
	}()

	restarts := 0
	for time.Since(start)+2500*time.Millisecond <= runFor {
		time.Sleep(2500 * time.Millisecond)
		gen := p.info(t).ActiveGeneration
		if restarts%2 == 0 {
			if r := p.reload(t); r.Error != "" {
				t.Fatalf("reload %d: %s", restarts, r.Error)
			}
		} else if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
			t.Fatal(err)
		}
		// Complete: a newer generation is active and the old one has gone
		// (it exits once it has handed over every connection).
		p.waitInfo(t, fmt.Sprintf("restart %d complete", restarts), func(i agent.Info) bool {
			return i.ActiveGeneration > gen && len(i.Generations) == 1
		})
		restarts++
		// The event stream goes on through the new generation.
		seen := events.Load()
		for deadline := time.Now().Add(20 * time.Second); events.Load() == seen; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("no event within 20 s after restart %d (%d events before it)", restarts, seen)
			}
		}
	}
	time.Sleep(time.Until(start.Add(runFor)))
	close(stop)
	for range 2 {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	info := p.info(t)
	t.Logf("%d restarts in %v, active generation %d; %d queries, %d events", restarts, time.Since(start).Round(time.Millisecond), info.ActiveGeneration, queries.Load(), events.Load())
	if info.ActiveGeneration != 1+restarts {
		t.Errorf("active generation %d after %d restarts from generation 1 (a generation was restarted without a hand-over)", info.ActiveGeneration, restarts)
	}
	if d := p.metric(t, `meshlet_proxy_connections_total{direction="outbound"}`) - before; d != 2 {
		t.Errorf("the proxy accepted %v connections; the clients opened 2", d)
	}
	if n := acceptedConns.Load(); n != 2 {
		t.Errorf("the backend accepted %d connections; want 2 (a connection was re-made behind the client)", n)
	}
	if q := queries.Load(); q < 4 {
		t.Errorf("%d queries answered; want at least 4 (at 0, 10 and 20 s and at the end, past 30 s)", q)
	}
	// Exactly both connections at every restart: never one left behind,
	// never one moved twice.
	if moved := counter("handed_over") - movedBefore; moved != float64(2*restarts) {
		t.Errorf("%v connections moved over %d restarts; want both at every restart (%d)", moved, restarts, 2*restarts)
	}
	if adopted := counter("adopted") - adoptedBefore; adopted != float64(2*restarts) {
		t.Errorf("%v connections adopted over %d restarts; want %d", adopted, restarts, 2*restarts)
	}
	for name, want := range map[string]float64{
		`meshlet_proxy_drain_closed_connections_total{direction="outbound"}`:  0,
		`meshlet_proxy_errors_total{direction="outbound",kind="handover"}`:    0,
		`meshlet_proxy_errors_total{direction="any",kind="handover_refused"}`: 0,
	} {
		if v := p.metricOr(name, 0); v != want {
			t.Errorf("%s = %v, want %v", name, v, want)
		}
	}
}
