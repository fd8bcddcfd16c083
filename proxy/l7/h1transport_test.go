package l7

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7/h1"
)

// countConns returns the backend's count of accepted connections.
func countConns(be *backend) *atomic.Int64 { return &be.conns }

func post(t *testing.T, c *http.Client, addr, host string, body io.Reader, length int64) (int, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://"+addr+"/echo", body)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	req.ContentLength = length
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("POST: %v", err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("reading response: %v", err)
	}
	return resp.StatusCode, string(b)
}

func echoBackend(t *testing.T) *backend {
	return startBackend(t, "echo", func(w http.ResponseWriter, r *http.Request) {
		b, err := io.ReadAll(r.Body)
		if err != nil {
			w.WriteHeader(400)
			return
		}
		fmt.Fprintf(w, "%s %d %s", r.Method, len(b), b[:min(len(b), 16)])
	})
}

// The direct HTTP/1.1 path keeps one upstream connection for sequential
// requests, and a pooled connection the upstream closed while idle is
// detected and replaced — a POST on it must not fail.
func TestDirectH1PoolReuseAndStaleConnection(t *testing.T) {
	t.Parallel()
	be := echoBackend(t)
	conns := countConns(be)
	tp := startProxy(t, mustLoad(t, oneClusterConfig("", "", be.addr)), "127.0.0.1:80", l4.Outbound)
	c := h1Client()
	for i := 0; i < 20; i++ {
		body := strings.Repeat("b", 1024)
		if code, got := post(t, c, tp.addr, "s", strings.NewReader(body), int64(len(body))); code != 200 || got != "POST 1024 bbbbbbbbbbbbbbbb" {
			t.Fatalf("request %d: %d %q", i, code, got)
		}
	}
	if n := conns.Load(); n != 1 {
		t.Fatalf("20 sequential requests used %d upstream connections; want 1 (pooled)", n)
	}
	cl := tp.tab.Load().clusters["c"]
	if fp, _ := cl.FastPathPool(be.addr); fp.Idle != 1 {
		t.Fatalf("direct pool holds %d idle connections; want 1 (requests took another path?)", fp.Idle)
	}

	// The upstream closes its idle connections (as an idle timeout would).
	// net/http closes only connections it already counts as idle, which the
	// last one may not be yet on a loaded machine: repeat until it is gone.
	waitUntil(t, func() bool {
		be.srv.SetKeepAlivesEnabled(false)
		be.srv.SetKeepAlivesEnabled(true)
		fp, _ := cl.FastPathPool(be.addr)
		return fp.Live == 0
	})
	for i := 0; i < 3; i++ {
		if code, got := post(t, c, tp.addr, "s", strings.NewReader("after"), 5); code != 200 || got != "POST 5 after" {
			t.Fatalf("POST after the upstream closed the pooled connection: %d %q", code, got)
		}
	}
	if n := conns.Load(); n != 2 {
		t.Fatalf("upstream connections: %d; want 2", n)
	}
}

// Bodies the direct path does not buffer (large, or of unknown length) and
// responses that close the connection still arrive intact.
func TestDirectH1FallbacksAndConnectionClose(t *testing.T) {
	t.Parallel()
	be := echoBackend(t)
	closer := startBackend(t, "closer", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Connection", "close")
		io.WriteString(w, "bye")
	})
	closerConns := countConns(closer)
	cfg := mustLoad(t, `
services:
- name: s
  hosts: [s]
  routes: [{name: r, destinations: [{cluster: c}]}]
- name: closer
  hosts: [closer]
  routes: [{name: r, destinations: [{cluster: closer}]}]
clusters:
- {name: c, endpoints: [{address: "`+be.addr+`"}]}
- {name: closer, endpoints: [{address: "`+closer.addr+`"}]}
`)
	tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	c := h1Client()

	big := bytes.Repeat([]byte("L"), h1.MaxBody+1)
	if code, got := post(t, c, tp.addr, "s", bytes.NewReader(big), int64(len(big))); code != 200 || got != fmt.Sprintf("POST %d LLLLLLLLLLLLLLLL", len(big)) {
		t.Fatalf("large body: %d %q", code, got)
	}
	// Unknown length: the client sends it chunked.
	if code, got := post(t, c, tp.addr, "s", io.MultiReader(strings.NewReader("chunk"), strings.NewReader("ed")), -1); code != 200 || got != "POST 7 chunked" {
		t.Fatalf("chunked body: %d %q", code, got)
	}
	for i := 0; i < 3; i++ {
		if code, _, body := get(t, c, tp.addr, "closer", "/"); code != 200 || body != "bye" {
			t.Fatalf("Connection: close response %d: %d %q", i, code, body)
		}
	}
	if n := closerConns.Load(); n != 3 {
		t.Fatalf("upstream connections to a Connection: close backend: %d; want 3 (never reused)", n)
	}
}

// An upstream that answers garbage, or closes without answering, is a 502
// and its connection is not pooled.
func TestDirectH1BadUpstream(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var accepted atomic.Int64
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			n := accepted.Add(1)
			go func() {
				defer conn.Close()
				br := bufio.NewReader(conn)
				if _, err := http.ReadRequest(br); err != nil {
					return
				}
				if n%2 == 1 {
					io.WriteString(conn, "NOT HTTP AT ALL\r\n\r\n")
				} // else: close without a response
			}()
		}
	}()
	tp := startProxy(t, mustLoad(t, oneClusterConfig("", "", ln.Addr().String())), "127.0.0.1:80", l4.Outbound)
	c := h1Client()
	for i := 0; i < 4; i++ {
		if code, _ := post(t, c, tp.addr, "s", strings.NewReader("x"), 1); code != http.StatusBadGateway {
			t.Fatalf("request %d: %d; want 502", i, code)
		}
	}
	if n := accepted.Load(); n != 4 {
		t.Fatalf("upstream accepted %d connections for 4 requests; want 4 (a failed connection is never reused)", n)
	}
	if fp, known := tp.tab.Load().clusters["c"].FastPathPool(ln.Addr().String()); known {
		t.Fatalf("direct pool after failures: %d idle, %d open; want the endpoint's empty pool dropped", fp.Idle, fp.Open)
	}
}

// A pooled connection the upstream closes just as the next request goes out
// (its idle timeout fired as the bytes arrived, and nothing came back) looks
// alive to the liveness peek; an idempotent request on it is sent again on a
// new connection, as net/http's Transport does, instead of failing with 502.
// A POST is not sent twice: it fails.
func TestDirectH1StaleConnectionRaceResent(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var conns, drops atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer c.Close()
				br := bufio.NewReader(c)
				for i := 0; ; i++ {
					req, err := http.ReadRequest(br)
					if err != nil {
						return
					}
					_, _ = io.Copy(io.Discard, req.Body)
					if req.URL.Path == "/drop" && i > 0 {
						drops.Add(1)
						return // on a reused connection: closed unanswered
					}
					fmt.Fprintf(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
				}
			}()
		}
	}()
	tp := startProxy(t, mustLoad(t, oneClusterConfig("", "", ln.Addr().String())), "127.0.0.1:80", l4.Outbound)
	c := h1Client()
	for _, path := range []string{"/", "/drop", "/"} {
		if code, _, body := get(t, c, tp.addr, "s", path); code != 200 || body != "ok" {
			t.Fatalf("GET %s: %d %q, want 200 \"ok\"", path, code, body)
		}
	}
	if n, d := conns.Load(), drops.Load(); n != 2 || d != 1 {
		t.Fatalf("upstream connections %d, requests closed unanswered %d; want 2 and 1 (GET /drop resent on a new connection)", n, d)
	}
	req, err := http.NewRequest(http.MethodPost, "http://"+tp.addr+"/drop", strings.NewReader("once"))
	if err != nil {
		t.Fatal(err)
	}
	req.Host = "s"
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadGateway || drops.Load() != 2 {
		t.Fatalf("POST /drop on a reused connection: %d, upstream saw it %d times; want 502 and once", resp.StatusCode, drops.Load()-1)
	}
}
