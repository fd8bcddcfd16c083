package l7

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
)

// testProxy runs a Engine behind a real loopback listener. Every accepted
// connection is handed to ServeConn with a fixed original destination, the
// way the proxy's capture listener would after SO_ORIGINAL_DST.
type testProxy struct {
	*Engine
	addr string
	log  *proctest.SyncBuf
	dst  atomic.Pointer[netip.AddrPort]
	dir  l4.Direction
	ln   net.Listener
}

func startProxy(t testing.TB, cfg config.L7, dst string, dir l4.Direction, opts ...func(*Options)) *testProxy {
	t.Helper()
	tp := &testProxy{log: &proctest.SyncBuf{}, dir: dir}
	o := Options{AccessLog: tp.log, Dial: loopbackOnly(t)}
	for _, f := range opts {
		f(&o)
	}
	p, err := New(cfg, o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	tp.Engine = p
	tp.setDst(dst)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tp.ln = ln
	tp.addr = ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				p.ServeConn(ctx, c, *tp.dst.Load(), tp.dir)
			}()
		}
	}()
	t.Cleanup(func() {
		ln.Close()
		cancel()
		p.Close()
		wg.Wait()
	})
	return tp
}

func (tp *testProxy) setDst(dst string) {
	ap := netip.MustParseAddrPort(dst)
	tp.dst.Store(&ap)
}

// backend is a real HTTP server (HTTP/1.1 and h2c) on loopback that names
// itself in X-Backend and counts requests.
type backend struct {
	name  string
	addr  string
	srv   *http.Server
	count atomic.Int64
	conns atomic.Int64 // connections accepted
}

func startBackend(t testing.TB, name string, h http.HandlerFunc) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &backend{name: name, addr: ln.Addr().String()}
	if h == nil {
		h = func(w http.ResponseWriter, r *http.Request) {
			fmt.Fprintf(w, "%s %s %s %s", name, r.Method, r.Host, r.URL.Path)
		}
	}
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	b.srv = &http.Server{Protocols: &protos, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b.count.Add(1)
		w.Header().Set("X-Backend", name)
		w.Header().Set("X-Proto", r.Proto)
		h(w, r)
	})}
	b.srv.ConnState = func(_ net.Conn, st http.ConnState) {
		if st == http.StateNew {
			b.conns.Add(1)
		}
	}
	go b.srv.Serve(ln)
	t.Cleanup(func() { b.srv.Close() })
	return b
}

func h1Client() *http.Client {
	return &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true}, Timeout: 10 * time.Second}
}

func h2cClient() *http.Client {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	return &http.Client{Transport: &http.Transport{Protocols: &p}, Timeout: 10 * time.Second}
}

// get issues a request through the proxy with the given Host and headers.
func get(t testing.TB, c *http.Client, proxyAddr, host, path string, hdr ...string) (int, http.Header, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, "http://"+proxyAddr+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("GET %s%s: %v", host, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil && !errors.Is(err, io.EOF) {
		t.Fatalf("reading body: %v", err)
	}
	return resp.StatusCode, resp.Header, strings.TrimSpace(string(b))
}

func mustLoad(t testing.TB, y string) config.L7 {
	t.Helper()
	c, err := config.ParseL7([]byte(y))
	if err != nil {
		t.Fatalf("Load: %v\n%s", err, y)
	}
	return c
}

// unusedAddr returns a loopback address nobody listens on.
func unusedAddr(t testing.TB) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	a := ln.Addr().String()
	ln.Close()
	return a
}

func waitFor(ms int) { time.Sleep(time.Duration(ms) * time.Millisecond) }

// fakeResolver answers from memory: tests never resolve names for real.
type fakeResolver struct {
	mu    sync.Mutex
	ips   []netip.Addr
	err   bool
	asked string
}

func (r *fakeResolver) set(ips ...string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ips = nil
	for _, s := range ips {
		r.ips = append(r.ips, netip.MustParseAddr(s))
	}
}

func (r *fakeResolver) fail(b bool) { r.mu.Lock(); r.err = b; r.mu.Unlock() }

func (r *fakeResolver) lastHost() string { r.mu.Lock(); defer r.mu.Unlock(); return r.asked }

func (r *fakeResolver) LookupNetIP(_ context.Context, _, host string) ([]netip.Addr, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.asked = host
	if r.err {
		return nil, errors.New("fake resolver: lookup failed")
	}
	return append([]netip.Addr(nil), r.ips...), nil
}

// loopbackOnly is the tests' upstream dialer: anything but loopback fails the
// test (tests never send traffic off the machine).
func loopbackOnly(t testing.TB) DialFunc {
	d := &net.Dialer{}
	return func(ctx context.Context, _ l4.Direction, network, addr string) (net.Conn, error) {
		ap, err := netip.ParseAddrPort(addr)
		if err != nil || !ap.Addr().IsLoopback() {
			t.Errorf("test tried to dial non-loopback %q", addr)
			return nil, fmt.Errorf("refusing non-loopback %q in tests", addr)
		}
		return d.DialContext(ctx, network, addr)
	}
}
