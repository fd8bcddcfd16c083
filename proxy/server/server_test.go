package server_test

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/server"
	"github.com/meshlet/meshlet/proxy/stats"
)

type harness struct {
	srv      *server.Server
	stats    *stats.Region
	outbound string
	inbound  string
	health   string
	prom     string
	admin    string
	dst      atomic.Value // netip.AddrPort
}

func listen(t testing.TB) *net.TCPListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return ln.(*net.TCPListener)
}

// start runs a generation on loopback listeners. Connections are sent to
// h.dst (standing in for the original destination, which needs iptables;
// the privileged tests cover the real thing).
func start(t *testing.T, doc string, drain time.Duration) *harness {
	t.Helper()
	if doc == "" {
		doc = "apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\n"
	}
	cfg, err := config.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{stats: stats.NewPrivate()}
	ls := server.Listeners{Outbound: []*net.TCPListener{listen(t)}, Inbound: []*net.TCPListener{listen(t)}, Health: listen(t), Prometheus: listen(t), Admin: listen(t)}
	h.outbound, h.inbound = ls.Outbound[0].Addr().String(), ls.Inbound[0].Addr().String()
	h.health, h.prom, h.admin = ls.Health.Addr().String(), ls.Prometheus.Addr().String(), ls.Admin.Addr().String()
	h.srv, err = server.New(server.Options{
		Config: cfg, Listeners: ls, Stats: h.stats, Generation: 7, DrainDuration: drain, Version: "test",
		OrigDst: func(*net.TCPConn) (netip.AddrPort, error) {
			d, _ := h.dst.Load().(netip.AddrPort)
			if !d.IsValid() {
				return d, errors.New("no destination set")
			}
			return d, nil
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	h.srv.Start()
	t.Cleanup(h.srv.Close)
	return h
}

func (h *harness) to(addr string) { h.dst.Store(netip.MustParseAddrPort(addr)) }

func (h *harness) counter(name string) uint64 {
	var v uint64
	h.stats.Each(func(n string, x uint64) {
		if n == name {
			v = x
		}
	})
	return v
}

// echo serves an echo backend and reports each connection's remote address.
func echo(t *testing.T) (string, <-chan string) {
	t.Helper()
	ln := listen(t)
	t.Cleanup(func() { ln.Close() })
	remotes := make(chan string, 100)
	go func() {
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				return
			}
			remotes <- c.RemoteAddr().String()
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
				_ = c.CloseWrite()
			}()
		}
	}()
	return ln.Addr().String(), remotes
}

func dial(t testing.TB, addr string) *net.TCPConn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	return c.(*net.TCPConn)
}

func TestPassthroughHalfCloseAndSource(t *testing.T) {
	backend, remotes := echo(t)
	h := start(t, "", 0)
	h.to(backend)
	for _, tc := range []struct {
		name, listener, wantSrc string
	}{
		{"outbound", h.outbound, "127.0.0.1"},
		{"inbound", h.inbound, "127.0.0.6"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dial(t, tc.listener)
			payload := strings.Repeat("meshlet ", 64<<10) // 512 KiB
			go func() {
				_, _ = io.WriteString(c, payload)
				_ = c.CloseWrite() // half-close: the backend sees EOF and replies with EOF
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("reading echo: %v", err)
			}
			if string(got) != payload {
				t.Fatalf("echo returned %d bytes, want %d", len(got), len(payload))
			}
			src, _, _ := net.SplitHostPort(<-remotes)
			if src != tc.wantSrc {
				t.Errorf("backend saw source %s, want %s", src, tc.wantSrc)
			}
		})
	}
	if v := h.counter(`meshlet_proxy_received_bytes_total{direction="inbound"}`); v != 512<<10 {
		t.Errorf("inbound received bytes = %d", v)
	}
	if v := h.counter(`meshlet_proxy_connections_total{direction="outbound"}`); v != 1 {
		t.Errorf("outbound connections = %d", v)
	}
}

// rejected asserts the proxy closes a connection to addr without serving
// it: the read ends with a reset or EOF (the reset may arrive before the
// dial returns). A read that times out — the connection was kept open —
// fails the test.
func rejected(t *testing.T, addr string) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		if !errors.Is(err, syscall.ECONNRESET) {
			t.Fatalf("dial %s: %v, want a connection that is then closed", addr, err)
		}
		return
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	n, err := c.Read(make([]byte, 1))
	switch {
	case err == nil:
		t.Fatalf("connection was served (%d bytes)", n)
	case !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, io.EOF):
		t.Fatalf("connection not rejected: read ended with %v, want a reset or EOF", err)
	}
}

func TestConnectRefusedResetsClient(t *testing.T) {
	ln := listen(t)
	addr := ln.Addr().String()
	ln.Close() // nothing listens there any more
	h := start(t, "", 0)
	h.to(addr)
	rejected(t, h.outbound)
	if v := h.counter(`meshlet_proxy_errors_total{direction="outbound",kind="connect"}`); v != 1 {
		t.Errorf("connect errors = %d", v)
	}
}

// fullBacklog returns an address whose SYNs are dropped: a socket listening
// with backlog 0 whose queue is already full.
func fullBacklog(t *testing.T) string {
	t.Helper()
	fd, err := syscall.Socket(syscall.AF_INET, syscall.SOCK_STREAM, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { syscall.Close(fd) })
	if err := syscall.Bind(fd, &syscall.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Listen(fd, 0); err != nil {
		t.Fatal(err)
	}
	sa, _ := syscall.Getsockname(fd)
	addr := fmt.Sprintf("127.0.0.1:%d", sa.(*syscall.SockaddrInet4).Port)
	for i := 0; i < 4; i++ {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err != nil {
			break
		}
		t.Cleanup(func() { c.Close() })
	}
	return addr
}

func TestConnectTimeout(t *testing.T) {
	addr := fullBacklog(t)
	h := start(t, "apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\noutbound:\n  connectTimeout: 300ms\n", 0)
	h.to(addr)
	c := dial(t, h.outbound)
	t0 := time.Now()
	_, _ = c.Read(make([]byte, 1))
	if d := time.Since(t0); d < 250*time.Millisecond || d > 5*time.Second {
		t.Errorf("client closed after %v, want about the 300ms connect timeout", d)
	}
	if v := h.counter(`meshlet_proxy_errors_total{direction="outbound",kind="connect"}`); v != 1 {
		t.Errorf("connect errors = %d", v)
	}
}

func TestIdleTimeout(t *testing.T) {
	backend, _ := echo(t)
	h := start(t, "apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\ninbound:\n  idleTimeout: 200ms\n", 0)
	h.to(backend)
	c := dial(t, h.inbound)
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	_, err := c.Read(make([]byte, 1)) // half-open: the client goes silent
	if err == nil {
		t.Fatal("read returned data on an idle connection")
	}
	if d := time.Since(t0); d < 150*time.Millisecond {
		t.Errorf("closed after %v, before the idle timeout", d)
	}
	if v := h.counter(`meshlet_proxy_errors_total{direction="inbound",kind="idle_timeout"}`); v != 1 {
		t.Errorf("idle timeouts = %d", v)
	}
}

func TestMaxConnections(t *testing.T) {
	backend, _ := echo(t)
	h := start(t, "apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\noutbound:\n  maxConnections: 1\n", 0)
	h.to(backend)
	first := dial(t, h.outbound)
	if _, err := first.Write([]byte("a")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(first, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	rejected(t, h.outbound)
	if v := h.counter(`meshlet_proxy_errors_total{direction="outbound",kind="overflow"}`); v != 1 {
		t.Errorf("overflow = %d", v)
	}
	// The first one still works.
	if _, err := first.Write([]byte("b")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(first, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
}

func TestSelfDestinationRejected(t *testing.T) {
	h := start(t, "", 0)
	h.to(h.outbound)
	rejected(t, h.outbound)
	if v := h.counter(`meshlet_proxy_errors_total{direction="any",kind="original_destination"}`); v != 1 {
		t.Errorf("original destination errors = %d", v)
	}
}

// TestDrain: a hot-restart drain with no successor to take connections
// stops accepting and keeps every established connection — a keep-alive
// connection idle after its response (the server spoke last) and a busy
// stream — until the client ends it: no silence is taken for a boundary.
// The client is raw (it never retries) and POSTs a body.
func TestDrain(t *testing.T) {
	backend, _ := echo(t)
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Length", fmt.Sprint(len(b)))
		w.WriteHeader(200)
		w.(http.Flusher).Flush() // head and body in two writes
		time.Sleep(5 * time.Millisecond)
		_, _ = w.Write(b)
	})}
	hl := listen(t)
	go func() { _ = hs.Serve(hl) }()
	t.Cleanup(func() { hs.Close() })

	h := start(t, "", 5*time.Second)
	// Keep-alive connection, idle after its request.
	h.to(hl.Addr().String())
	ka := dial(t, h.inbound)
	br := bufio.NewReader(ka)
	post := func(body string) error {
		fmt.Fprintf(ka, "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil || string(b) != body {
			return fmt.Errorf("response body %q, %v; want %q", b, err, body)
		}
		return nil
	}
	if err := post("before"); err != nil {
		t.Fatal(err)
	}

	// A stream that keeps talking through the drain.
	h.to(backend)
	st := dial(t, h.outbound)
	var wg sync.WaitGroup
	streamErr := make(chan error, 1)
	wg.Add(1)
	go func() {
		defer wg.Done()
		buf := make([]byte, 5)
		for i := 0; i < 20; i++ {
			if _, err := io.WriteString(st, "tick\n"); err != nil {
				streamErr <- err
				return
			}
			if _, err := io.ReadFull(st, buf); err != nil {
				streamErr <- err
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		_ = st.CloseWrite()
		_, err := io.ReadAll(st)
		streamErr <- err
	}()
	time.Sleep(50 * time.Millisecond)
	t0 := time.Now()
	h.srv.Drain(server.HotRestart)

	// The idle keep-alive connection stays open and serves the next request.
	time.Sleep(100 * time.Millisecond)
	if err := post("after the drain began"); err != nil {
		t.Errorf("idle keep-alive connection after the drain began: %v", err)
	}
	// No new connections are accepted.
	if c, err := net.DialTimeout("tcp", h.outbound, time.Second); err == nil {
		c.Close()
		t.Error("listener still accepting after drain")
	}
	wg.Wait()
	if err := <-streamErr; err != nil {
		t.Errorf("stream broken by drain: %v", err)
	}
	_ = ka.CloseWrite()
	if b, err := io.ReadAll(br); err != nil || len(b) != 0 {
		t.Errorf("keep-alive connection end: %q, %v", b, err)
	}
	h.srv.Wait()
	if d := time.Since(t0); d > 3*time.Second {
		t.Errorf("drain took %v after every connection ended", d)
	}
	if v := h.counter(`meshlet_proxy_drain_closed_connections_total{direction="inbound"}`); v != 0 {
		t.Errorf("drain-closed inbound = %d, want 0", v)
	}
	if v := h.counter(`meshlet_proxy_connections_total{direction="inbound"}`); v != 1 {
		t.Errorf("inbound connections = %d, want 1 (the client never reconnected)", v)
	}
}

// TestDrainKeepsJustAcceptedConnection: a connection accept(2) has
// returned but the accept goroutine has not counted yet (descheduled on a
// busy node) is served, and the hot-restart drain does not end without it.
func TestDrainKeepsJustAcceptedConnection(t *testing.T) {
	backend, _ := echo(t)
	h := start(t, "", 5*time.Second)
	h.to(backend)
	accepted, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	server.SetAfterAccept(h.srv, func() {
		once.Do(func() { close(accepted); <-release })
	})
	c := dial(t, h.outbound)
	<-accepted
	h.srv.Drain(server.HotRestart)
	waited := make(chan struct{})
	go func() { h.srv.Wait(); close(waited) }()
	select {
	case <-waited:
		t.Fatal("drain finished while an accepted connection was not yet served")
	case <-time.After(200 * time.Millisecond): // finish() checks every 20ms
	}
	close(release)
	if _, err := io.WriteString(c, "late\n"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "late\n" {
		t.Fatalf("just-accepted connection: %q, %v; want the echo", buf, err)
	}
	_ = c.CloseWrite()
	_, _ = io.ReadAll(c)
	select {
	case <-waited:
	case <-time.After(5 * time.Second):
		t.Fatal("drain did not finish after the connection ended")
	}
}

func TestDrainDeadline(t *testing.T) {
	backend, _ := echo(t)
	h := start(t, "", 300*time.Millisecond)
	h.to(backend)
	c := dial(t, h.outbound)
	if _, err := c.Write([]byte("a")); err != nil { // unanswered bytes: never quiescent
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	_, _ = c.Write([]byte("b"))
	go func() {
		for range 100 {
			if _, err := c.Write([]byte("c")); err != nil {
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	t0 := time.Now()
	h.srv.Drain(server.HotRestart)
	h.srv.Wait()
	if d := time.Since(t0); d < 250*time.Millisecond || d > 3*time.Second {
		t.Errorf("drain returned after %v, want about 300ms", d)
	}
	if v := h.counter(`meshlet_proxy_drain_closed_connections_total{direction="outbound"}`); v != 1 {
		t.Errorf("drain-closed outbound = %d, want 1", v)
	}
	_ = c.SetReadDeadline(time.Now().Add(2 * time.Second))
	if _, err := io.ReadAll(c); err != nil && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("connection not closed at the deadline: %v", err)
	}
}

func TestShutdownDrainKeepsOutbound(t *testing.T) {
	backend, _ := echo(t)
	h := start(t, "", 5*time.Second)
	h.to(backend)
	h.srv.Drain(server.Shutdown)
	if c, err := net.DialTimeout("tcp", h.inbound, time.Second); err == nil {
		c.Close()
		t.Error("inbound still accepting after shutdown drain")
	}
	c := dial(t, h.outbound)
	if _, err := c.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		h.stats.Each(func(n string, v uint64) { t.Log(n, v) })
		t.Fatalf("outbound broken during shutdown drain: %v", err)
	}
	resp, err := http.Get("http://" + h.health + "/healthz/ready")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Errorf("/healthz/ready while draining = %d", resp.StatusCode)
	}
	c.Close()
	h.srv.Wait() // no connection left: returns before the deadline
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestEndpoints(t *testing.T) {
	h := start(t, "", 0)
	h.stats.SetNote("generation 8 failed to start: bad config")
	if code, _ := get(t, "http://"+h.health+"/healthz/ready"); code != 200 {
		t.Errorf("/healthz/ready = %d", code)
	}
	code, body := get(t, "http://"+h.prom+"/stats/prometheus")
	for _, want := range []string{
		"# TYPE meshlet_proxy_connections_total counter",
		`meshlet_proxy_connections_total{direction="inbound"} 0`,
		"meshlet_proxy_generation 7",
		`meshlet_proxy_active_connections{direction="outbound"} 0`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/stats/prometheus (%d) lacks %q", code, want)
		}
	}
	_, body = get(t, "http://"+h.admin+"/server_info")
	var si server.ServerInfo
	if err := json.Unmarshal([]byte(body), &si); err != nil {
		t.Fatal(err)
	}
	if si.Generation != 7 || si.State != "LIVE" || len(si.ConfigHash) != 64 || si.LastReloadError != "generation 8 failed to start: bad config" {
		t.Errorf("/server_info = %+v", si)
	}
	if code, body := get(t, "http://"+h.admin+"/ready"); code != 200 || strings.TrimSpace(body) != "LIVE" {
		t.Errorf("/ready = %d %q", code, body)
	}
	if _, body := get(t, "http://"+h.admin+"/config_dump"); !strings.Contains(body, `"connectTimeout": "10s"`) {
		t.Errorf("/config_dump = %s", body)
	}
	if _, body := get(t, "http://"+h.admin+"/stats"); !strings.Contains(body, "meshlet_proxy_connections_total{direction=\"outbound\"}: 0") {
		t.Errorf("/stats = %s", body)
	}
}

// TestGarbageAndHalfOpen: junk bytes and clients that connect and vanish
// leave the generation serving.
func TestGarbageAndHalfOpen(t *testing.T) {
	backend, _ := echo(t)
	h := start(t, "apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\noutbound:\n  idleTimeout: 200ms\n", 0)
	h.to(backend)
	for i := 0; i < 50; i++ {
		c, err := net.Dial("tcp", h.outbound)
		if err != nil {
			t.Fatal(err)
		}
		if i%2 == 0 {
			_, _ = c.Write([]byte{0, 0xff, 0x16, 0x03, 0x01, '\r', '\n'})
		}
		if i%3 == 0 {
			_ = c.(*net.TCPConn).SetLinger(0) // reset
		}
		c.Close()
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		_, out := h.srv.Active()
		if out == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d connections still active", out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	c := dial(t, h.outbound)
	if _, err := c.Write([]byte("ok")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
		t.Fatalf("proxy no longer serving: %v", err)
	}
}
