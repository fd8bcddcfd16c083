package server_test

import (
	"bufio"
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/server"
	"github.com/meshlet/meshlet/proxy/stats"
)

// countingListener accepts on a loopback port and counts the connections
// accepted: a hot restart must not make any client reconnect.
type countingListener struct {
	*net.TCPListener
	accepted atomic.Int64
}

func backendListener(t testing.TB) *countingListener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &countingListener{TCPListener: ln.(*net.TCPListener)}
}

// serve runs handle on every accepted connection.
func (l *countingListener) serve(handle func(c *net.TCPConn)) string {
	go func() {
		for {
			c, err := l.AcceptTCP()
			if err != nil {
				return
			}
			l.accepted.Add(1)
			go func() { defer c.Close(); handle(c) }()
		}
	}()
	return l.Addr().String()
}

// splitWriter answers each request line "N\n" (N body bytes follow in the
// request) with a response head, a pause of 1-50ms, then a body of N bytes:
// a response boundary no silence can find.
func splitWriter(c *net.TCPConn) {
	br := bufio.NewReader(c)
	for i := 0; ; i++ {
		line, err := br.ReadString('\n')
		if err != nil {
			return
		}
		n, _ := strconv.Atoi(strings.TrimSpace(line))
		body := make([]byte, n)
		if _, err := io.ReadFull(br, body); err != nil {
			return
		}
		fmt.Fprintf(c, "LEN %d\n", n)
		time.Sleep(time.Duration(1+i%50) * time.Millisecond)
		if _, err := c.Write(body); err != nil {
			return
		}
	}
}

// events streams numbered lines every 5ms until the client goes.
func events(c *net.TCPConn) {
	for i := 0; ; i++ {
		if _, err := fmt.Fprintf(c, "data: %d\n", i); err != nil {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// generations runs two generations in this process the way the agent runs
// them: the new one on duplicates of the old one's listening sockets, with
// the two ends of a SOCK_SEQPACKET pair as the hand-over socket, and one
// shared counter region.
type generations struct {
	old, next *server.Server
	oldAddr   string
	stats     *stats.Region
	oldEnd    *net.UnixConn
	dst       atomic.Value
}

func dupListener(t testing.TB, ln *net.TCPListener) *net.TCPListener {
	t.Helper()
	f, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	l, err := net.FileListener(f)
	if err != nil {
		t.Fatal(err)
	}
	return l.(*net.TCPListener)
}

func startGenerations(t testing.TB, drain time.Duration) *generations {
	t.Helper()
	cfg, err := config.Parse([]byte("apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\n"))
	if err != nil {
		t.Fatal(err)
	}
	g := &generations{stats: stats.NewPrivate()}
	origDst := func(*net.TCPConn) (netip.AddrPort, error) { return g.dst.Load().(netip.AddrPort), nil }
	out := listen(t)
	t.Cleanup(func() { out.Close() })
	g.oldAddr = out.Addr().String()
	g.old, err = server.New(server.Options{Config: cfg, Listeners: server.Listeners{Outbound: []*net.TCPListener{dupListener(t, out)}},
		Stats: g.stats, Generation: 1, DrainDuration: drain, OrigDst: origDst})
	if err != nil {
		t.Fatal(err)
	}
	g.old.Start()
	t.Cleanup(g.old.Close)
	oldEnd, newEnd := proctest.HandoverPair(t)
	g.oldEnd = oldEnd
	g.next, err = server.New(server.Options{Config: cfg, Listeners: server.Listeners{Outbound: []*net.TCPListener{dupListener(t, out)}},
		Stats: g.stats, Generation: 2, DrainDuration: drain, OrigDst: origDst, Handover: newEnd})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.next.Close)
	return g
}

// connect opens a client connection through the old generation to l and
// waits until l has accepted it (the destination is read after accept).
func (g *generations) connect(t testing.TB, l *countingListener) *net.TCPConn {
	t.Helper()
	before := l.accepted.Load()
	g.dst.Store(netip.MustParseAddrPort(l.Addr().String()))
	c := dial(t, g.oldAddr)
	for deadline := time.Now().Add(5 * time.Second); l.accepted.Load() == before; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("backend never saw the connection")
		}
	}
	return c
}

func (g *generations) counter(name string) uint64 {
	var v uint64
	g.stats.Each(func(n string, x uint64) {
		if n == name {
			v = x
		}
	})
	return v
}

// restart starts the new generation and hands the old one's connections to
// it; it returns when the old generation is gone.
func (g *generations) restart(t testing.TB) time.Duration {
	t.Helper()
	g.next.Start()
	t0 := time.Now()
	g.old.HandOver(g.oldEnd)
	g.old.Wait()
	return time.Since(t0)
}

// TestHandOverLosesNothing: request/response with split writes (idle or
// mid-response at the restart), a server-sent stream, an echo stream that
// half-closes, and a bulk upload being spliced all cross a hot restart on
// their connections: every byte arrives once, in order, no connection is
// closed or reopened, and the old generation is gone at once.
func TestHandOverLosesNothing(t *testing.T) {
	g := startGenerations(t, 10*time.Second)
	reqs, evs, echoes, bulk := backendListener(t), backendListener(t), backendListener(t), backendListener(t)
	reqs.serve(splitWriter)
	evs.serve(events)
	echoes.serve(func(c *net.TCPConn) { // answers after the client's EOF, late
		b, _ := io.ReadAll(c)
		time.Sleep(300 * time.Millisecond)
		_, _ = c.Write(b)
		_ = c.CloseWrite()
	})
	sums := make(chan []byte, 1)
	bulk.serve(func(c *net.TCPConn) {
		h := sha256.New() // a slow reader: the upload is mid-way at the restart
		buf := make([]byte, 64<<10)
		for {
			n, err := c.Read(buf)
			h.Write(buf[:n])
			if err != nil {
				break
			}
			time.Sleep(time.Millisecond)
		}
		sums <- h.Sum(nil)
		_, _ = c.Write([]byte("done"))
	})

	const clients = 6
	var wg sync.WaitGroup
	errs := make(chan error, 32)
	restarted := make(chan struct{})
	var served atomic.Int64
	for i := range clients {
		c := g.connect(t, reqs)
		wg.Add(1)
		go func() {
			defer wg.Done()
			br := bufio.NewReader(c)
			for j := 0; ; j++ {
				select {
				case <-restarted:
					if j > 40 {
						return
					}
				default:
				}
				size := 100 + (i*131+j*17)%3000
				body := bytes.Repeat([]byte{byte('a' + j%26)}, size)
				fmt.Fprintf(c, "%d\n", size)
				if _, err := c.Write(body); err != nil {
					errs <- fmt.Errorf("client %d request %d: %w", i, j, err)
					return
				}
				head, err := br.ReadString('\n')
				if err != nil || head != fmt.Sprintf("LEN %d\n", size) {
					errs <- fmt.Errorf("client %d request %d: head %q, %v", i, j, head, err)
					return
				}
				got := make([]byte, size)
				if _, err := io.ReadFull(br, got); err != nil || !bytes.Equal(got, body) {
					errs <- fmt.Errorf("client %d request %d: body %v", i, j, err)
					return
				}
				served.Add(1)
				if i%2 == 0 {
					time.Sleep(3 * time.Millisecond) // idle between requests
				}
			}
		}()
	}
	ev := g.connect(t, evs)
	ec := g.connect(t, echoes)
	bc := g.connect(t, bulk)
	data := make([]byte, 64<<20)
	_, _ = rand.Read(data)
	want := sha256.Sum256(data)
	go func() {
		_, err := bc.Write(data)
		if err != nil {
			errs <- fmt.Errorf("bulk upload: %w", err)
		}
		_ = bc.CloseWrite()
	}()
	wg.Add(1)
	go func() { // events: every number once, in order, across the restart
		defer wg.Done()
		br := bufio.NewReader(ev)
		for i := 0; i < 400; i++ {
			line, err := br.ReadString('\n')
			if err != nil || line != fmt.Sprintf("data: %d\n", i) {
				errs <- fmt.Errorf("event %d: %q, %v", i, line, err)
				return
			}
		}
	}()
	wg.Add(1)
	go func() { // echo: write half closed before the restart, reads after it
		defer wg.Done()
		_, _ = ec.Write([]byte("hello"))
		time.Sleep(100 * time.Millisecond)
		_, _ = ec.Write([]byte(" world"))
		_ = ec.CloseWrite()
		b, err := io.ReadAll(ec)
		if err != nil || string(b) != "hello world" {
			errs <- fmt.Errorf("echo: %q, %v", b, err)
		}
	}()

	time.Sleep(150 * time.Millisecond)
	took := g.restart(t)
	close(restarted)
	t.Logf("old generation gone %v after the hand-over began", took)
	if took > 2*time.Second {
		t.Errorf("old generation took %v to hand over and exit", took)
	}
	wg.Wait()
	_ = bc.SetReadDeadline(time.Now().Add(20 * time.Second))
	if b, err := io.ReadAll(bc); err != nil || string(b) != "done" {
		t.Errorf("bulk upload answer %q, %v", b, err)
	}
	if got := <-sums; !bytes.Equal(got, want[:]) {
		t.Error("bulk upload corrupted across the hand-over")
	}
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	for name, l := range map[string]*countingListener{"requests": reqs, "events": evs, "echo": echoes, "bulk": bulk} {
		want := int64(1)
		if name == "requests" {
			want = clients
		}
		if n := l.accepted.Load(); n != want {
			t.Errorf("%s backend accepted %d connections, want %d (nothing reconnects)", name, n, want)
		}
	}
	const conns = clients + 3
	for name, want := range map[string]uint64{
		`meshlet_proxy_connections_total{direction="outbound"}`:              conns,
		`meshlet_proxy_handed_over_connections_total{direction="outbound"}`:  conns,
		`meshlet_proxy_adopted_connections_total{direction="outbound"}`:      conns,
		`meshlet_proxy_drain_closed_connections_total{direction="outbound"}`: 0,
		`meshlet_proxy_errors_total{direction="outbound",kind="handover"}`:   0,
	} {
		if v := g.counter(name); v != want {
			t.Errorf("%s = %d, want %d", name, v, want)
		}
	}
	t.Logf("%d requests served", served.Load())
}
