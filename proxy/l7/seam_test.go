package l7_test

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7"
	"github.com/meshlet/meshlet/proxy/server"
)

// TestThroughGenerationServer runs the engine behind the proxy engineer's
// generation server (real listeners, the l4 seam, its forwarder for opaque
// TCP, and its hot-restart drain).
func TestThroughGenerationServer(t *testing.T) {
	t.Parallel()
	slowStarted := make(chan struct{}, 1)
	beLn, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	beSrv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			slowStarted <- struct{}{}
			time.Sleep(300 * time.Millisecond)
		}
		w.Header().Set("X-Backend", "app")
		fmt.Fprint(w, "ok "+r.URL.Path)
	})}
	go beSrv.Serve(beLn)
	defer beSrv.Close()
	be := struct{ addr string }{beLn.Addr().String()}
	echo, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer echo.Close()
	go func() {
		for {
			c, err := echo.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	var dst atomic.Pointer[netip.AddrPort]
	setDst := func(a string) { ap := netip.MustParseAddrPort(a); dst.Store(&ap) }
	setDst(be.addr)

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.ParseL7([]byte("detection: {timeout: 200ms}"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := l7.New(cfg, l7.Options{AccessLog: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	var choose func(*l4ConnAlias) l4HandlerAlias
	srv, err := server.New(server.Options{
		Config:        config.Default(),
		Listeners:     server.Listeners{Outbound: []*net.TCPListener{ln.(*net.TCPListener)}},
		OrigDst:       func(*net.TCPConn) (netip.AddrPort, error) { return *dst.Load(), nil },
		Chooser:       func(c *l4ConnAlias) l4HandlerAlias { return choose(c) },
		DrainDuration: 3 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	choose = p.Chooser(srv.Forwarder())
	srv.Start()
	defer srv.Close()

	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + ln.Addr().String() + "/a")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "ok /a" || resp.Header.Get("X-Backend") != "app" {
		t.Fatalf("HTTP through seam: %d %q", resp.StatusCode, b)
	}
	// Opaque TCP detected and handed back to the L4 forwarder with the peeked bytes.
	setDst(echo.Addr().String())
	tc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	msg := "\x00\x01 not http\n"
	tc.Write([]byte(msg))
	got := make([]byte, len(msg))
	tc.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := io.ReadFull(tc, got); err != nil || string(got) != msg {
		t.Fatalf("TCP fallback: %q %v", got, err)
	}
	tc.Close()

	// Hot-restart drain: the in-flight request completes, the keep-alive
	// connection is told to close.
	setDst(be.addr)
	type result struct {
		code  int
		body  string
		close bool
		err   error
	}
	res := make(chan result, 1)
	go func() {
		resp, err := c.Get("http://" + ln.Addr().String() + "/slow")
		if err != nil {
			res <- result{err: err}
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		res <- result{code: resp.StatusCode, body: string(b), close: resp.Close}
	}()
	<-slowStarted
	srv.Drain(server.HotRestart)
	r := <-res
	if r.err != nil || r.code != 200 || !strings.HasPrefix(r.body, "ok /slow") || !r.close {
		t.Fatalf("in-flight request across drain: %+v (want 200 with Connection: close)", r)
	}
	done := make(chan struct{})
	go func() { srv.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		t.Fatal("generation did not finish draining")
	}
}

type (
	l4ConnAlias    = l4.Conn
	l4HandlerAlias = l4.Handler
)
