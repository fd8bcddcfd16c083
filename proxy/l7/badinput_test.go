package l7

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/net/http2"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
)

func rawExchange(t *testing.T, addr, req string) (*http.Response, error) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		return nil, err
	}
	return http.ReadResponse(bufio.NewReader(c), nil)
}

func TestMalformedAndOversized(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", nil)
	cfg := mustLoad(t, "ports: [{port: 80, name: http-web}]\nlimits: {maxHeaderBytes: 8192}")
	tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	tp.setDst(be.addr) // original destination is the backend; port 80 semantics come from cfg
	tp2 := tp
	big := strings.Repeat("a", 64<<10)
	tests := []struct {
		name, req string
		code      int
	}{
		{"garbage request line", "GARBAGE-GARBAGE-GARBAGE\r\n\r\n", 400},
		{"bad version", "GET / HTTP/9.9\r\nHost: a\r\n\r\n", 505},
		{"no host in 1.1", "GET / HTTP/1.1\r\n\r\n", 400},
		{"header without colon", "GET / HTTP/1.1\r\nHost: a\r\nbroken header\r\n\r\n", 400},
		{"oversized header", "GET / HTTP/1.1\r\nHost: a\r\nX-Big: " + big + "\r\n\r\n", 431},
		{"conflicting lengths", "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc", 400},
		{"bad chunk", "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := rawExchange(t, tp2.addr, tt.req)
			if err != nil {
				t.Fatalf("no response: %v", err)
			}
			if resp.StatusCode != tt.code {
				t.Fatalf("status %d; want %d", resp.StatusCode, tt.code)
			}
		})
	}
	// The proxy still serves well-formed requests.
	if code, _, _ := get(t, h1Client(), tp.addr, "a", "/"); code != 200 {
		t.Fatalf("after bad input: %d", code)
	}
}

func TestSlowloris(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", nil)
	tp := startProxy(t, mustLoad(t, "ports: [{port: 80, name: http}]\nlimits: {readHeaderTimeout: 300ms}"), "127.0.0.1:80", l4.Outbound)
	tp.setDst(be.addr)
	var conns []net.Conn
	for i := 0; i < 20; i++ {
		c, err := net.Dial("tcp", tp.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		io.WriteString(c, "GET / HTTP/1.1\r\nHost: a\r\nX-Slow: ")
		conns = append(conns, c)
	}
	// Trickle one byte every 100ms: still cut off by the header deadline.
	start := time.Now()
	closed := 0
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(6 * time.Second))
	}
	go func() {
		for i := 0; i < 50; i++ { // 5s of trickling
			for _, c := range conns {
				c.Write([]byte("x"))
			}
			time.Sleep(100 * time.Millisecond)
		}
	}()
	for _, c := range conns {
		// Closed by the proxy: EOF, or a reset when trickled bytes were
		// still unread as it closed. A deadline error means still open.
		if _, err := io.ReadAll(c); err == nil || errors.Is(err, syscall.ECONNRESET) {
			closed++
		}
	}
	if closed != len(conns) || time.Since(start) > 4*time.Second {
		t.Fatalf("%d of %d slow connections closed in %v; want all within ~300ms", closed, len(conns), time.Since(start))
	}
	if code, _, _ := get(t, h1Client(), tp.addr, "a", "/"); code != 200 {
		t.Fatalf("normal client during slowloris: %d", code)
	}
}

// TestHTTP2RapidReset opens and immediately resets thousands of streams
// (CVE-2023-44487). The proxy must stay up with bounded goroutines and
// memory, and keep serving.
func TestHTTP2RapidReset(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(50 * time.Millisecond):
		case <-r.Context().Done():
		}
	})
	tp := startProxy(t, config.L7{}, be.addr, l4.Outbound)
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	heapBefore := ms.HeapInuse
	gBefore := runtime.NumGoroutine()
	c, err := net.Dial("tcp", tp.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fr := h2Handshake(t, c)
	go func() { // drain whatever the server sends
		for {
			if _, err := fr.ReadFrame(); err != nil {
				return
			}
		}
	}()
	const n = 5000
	sent := 0
	for i := 0; i < n; i++ {
		id := uint32(2*i + 1)
		if err := h2RequestErr(fr, id, "/r", true); err != nil {
			break // the server may close an abusive connection: fine
		}
		if err := fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
			break // the server may close an abusive connection: fine
		}
		sent++
	}
	time.Sleep(300 * time.Millisecond)
	g := runtime.NumGoroutine()
	runtime.GC()
	runtime.ReadMemStats(&ms)
	t.Logf("sent %d HEADERS+RST pairs; upstream saw %d requests; goroutines %d→%d; heap in use %d→%d KiB",
		sent, be.count.Load(), gBefore, g, heapBefore>>10, ms.HeapInuse>>10)
	if g > gBefore+300 {
		t.Errorf("goroutines grew from %d to %d", gBefore, g)
	}
	if ms.HeapInuse > heapBefore+64<<20 {
		t.Errorf("heap grew by %d MiB", (ms.HeapInuse-heapBefore)>>20)
	}
	if code, _, _ := get(t, h2cClient(), tp.addr, "a", "/"); code != 200 {
		t.Fatalf("proxy not serving after rapid reset: %d", code)
	}
}

// TestWebSocketUpgradePassthrough: an HTTP/1.1 upgrade is proxied and then
// bytes flow both ways on the raw connection.
func TestWebSocketUpgradePassthrough(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "ws", wsEcho)
	tp := startProxy(t, config.L7{}, be.addr, l4.Outbound)
	checkWebSocketEcho(t, tp.addr, "ws")
}

// wsEcho answers a WebSocket upgrade and then echoes what it reads,
// prefixed "echo:".
func wsEcho(w http.ResponseWriter, r *http.Request) {
	if r.Header.Get("Upgrade") != "websocket" {
		http.Error(w, "want upgrade", 400)
		return
	}
	conn, brw, err := http.NewResponseController(w).Hijack()
	if err != nil {
		return
	}
	defer conn.Close()
	fmt.Fprint(brw, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
	brw.Flush()
	buf := make([]byte, 64)
	for {
		n, err := brw.Read(buf)
		if err != nil {
			return
		}
		conn.Write([]byte("echo:" + string(buf[:n])))
	}
}

// checkWebSocketEcho upgrades a connection to proxyAddr (Host: host) and
// checks that bytes flow both ways on it.
func checkWebSocketEcho(t *testing.T, proxyAddr, host string) {
	t.Helper()
	c, err := net.Dial("tcp", proxyAddr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	fmt.Fprintf(c, "GET /ws HTTP/1.1\r\nHost: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: x\r\nSec-WebSocket-Version: 13\r\n\r\n", host)
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != 101 {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	for _, m := range []string{"one", "two"} {
		io.WriteString(c, m)
		got := make([]byte, len("echo:")+len(m))
		if _, err := io.ReadFull(br, got); err != nil || string(got) != "echo:"+m {
			t.Fatalf("after upgrade: %q %v", got, err)
		}
	}
}
