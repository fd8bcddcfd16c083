package l7_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testpb "google.golang.org/grpc/interop/grpc_testing"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7"
	"github.com/meshlet/meshlet/proxy/server"
	"github.com/meshlet/meshlet/proxy/stats"
)

type bidiEcho struct {
	testpb.UnimplementedTestServiceServer
}

func (bidiEcho) FullDuplexCall(s grpc.BidiStreamingServer[testpb.StreamingOutputCallRequest, testpb.StreamingOutputCallResponse]) error {
	for {
		in, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := s.Send(&testpb.StreamingOutputCallResponse{Payload: in.GetPayload()}); err != nil {
			return err
		}
	}
}

// TestHotRestartConfigChangeLosesNothing: constant HTTP/1.1 load (keep-alive
// clients that never retry, a backend writing head and body apart) plus a
// gRPC bidi stream open across generation switches that change the routing
// config. No request fails, the stream finishes on the first generation,
// and new requests see the new config. With a successor on a hand-over
// socket (as the agent runs generations) every HTTP/1.1 connection moves
// to the next generation between two requests: no client dials again.
// Without one, connections end only at a Connection: close: each client
// dials once per generation.
func TestHotRestartConfigChangeLosesNothing(t *testing.T) {
	t.Parallel()
	t.Run("hand-over", func(t *testing.T) { t.Parallel(); testHotRestart(t, true) })
	t.Run("no successor", func(t *testing.T) { t.Parallel(); testHotRestart(t, false) })
}

func testHotRestart(t *testing.T, handOver bool) {
	// Backends: HTTP (v1, v2) and gRPC.
	v1, v2 := splitBackend(t, "v1"), splitBackend(t, "v2")
	gln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	testpb.RegisterTestServiceServer(gs, bidiEcho{})
	go gs.Serve(gln)
	t.Cleanup(gs.Stop)

	conf := func(dest string) string {
		return fmt.Sprintf(`
ports: [{port: 80, name: http-web}]
services:
- name: web
  hosts: [web]
  routes: [{name: r, destinations: [{cluster: web}]}]
- name: echo
  hosts: [echo]
  routes: [{name: r, destinations: [{cluster: grpc}]}]
clusters:
- {name: web, endpoints: [{address: %q}]}
- {name: grpc, protocol: http2, endpoints: [{address: %q}]}
`, dest, gln.Addr().String())
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	shared := ln.(*net.TCPListener)
	defer shared.Close()
	st := stats.NewPrivate()
	gen := func(yaml string, handover *net.UnixConn) *server.Server {
		return startGeneration(t, shared, yaml, st, handover)
	}
	gen1 := gen(conf(v1), nil)

	cc, err := grpc.NewClient("passthrough:///"+shared.Addr().String(),
		grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority("echo"))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	stream, err := testpb.NewTestServiceClient(cc).FullDuplexCall(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	echo := func(i int) {
		msg := fmt.Sprint("m", i)
		if err := stream.Send(&testpb.StreamingOutputCallRequest{Payload: &testpb.Payload{Body: []byte(msg)}}); err != nil {
			t.Fatalf("stream send %d: %v", i, err)
		}
		got, err := stream.Recv()
		if err != nil || string(got.GetPayload().GetBody()) != msg {
			t.Fatalf("stream recv %d: %v %v", i, got, err)
		}
	}
	echo(0)

	// Constant load: 4 keep-alive clients that never retry.
	load := startRawClients(t, shared.Addr().String(), 4)
	waitDrained := func(g *server.Server, name string) { waitDrained(t, g, name) }
	// Hot restarts, each with a changed config: even generations route web
	// to v2, odd ones to v1. Every restart is a chance for the drain to cut
	// a keep-alive connection between two of its requests. The gRPC stream
	// stays on generation 1 across the first restart and ends there; as in
	// the agent, a generation is restarted only once its predecessor is
	// gone.
	const restarts = 4
	time.Sleep(200 * time.Millisecond)
	prev := gen1
	for r := 1; r <= restarts; r++ {
		yaml := conf([]string{v1, v2}[r%2])
		var next *server.Server
		if handOver {
			oldEnd, newEnd := proctest.HandoverPair(t)
			next = gen(yaml, newEnd)
			prev.HandOver(oldEnd)
		} else {
			next = gen(yaml, nil)
			prev.Drain(server.HotRestart)
		}
		if r == 1 {
			for i := 1; i <= 10; i++ { // the stream keeps working on generation 1
				echo(i)
				time.Sleep(20 * time.Millisecond)
			}
			stream.CloseSend()
			if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
				t.Fatalf("stream end: %v", err)
			}
		} else {
			time.Sleep(200 * time.Millisecond)
		}
		waitDrained(prev, fmt.Sprint("generation ", r))
		prev = next
	}
	load.finish()
	ok, failed, dials, seen := &load.ok, &load.failed, &load.dials, &load.seen
	_, sawV1 := seen.Load("v1")
	_, sawV2 := seen.Load("v2")
	t.Logf("requests ok=%d failed=%d dials=%d (v1 seen %v, v2 seen %v)", ok.Load(), failed.Load(), dials.Load(), sawV1, sawV2)
	moved := counter(st, `meshlet_proxy_handed_over_connections_total{direction="outbound"}`)
	adopted := counter(st, `meshlet_proxy_adopted_connections_total{direction="outbound"}`)
	accepted := counter(st, `meshlet_proxy_connections_total{direction="outbound"}`)
	t.Logf("connections: accepted %d, moved %d, adopted %d", accepted, moved, adopted)
	if handOver {
		// Each client's connection moves at every restart.
		if d := dials.Load(); d != 4 {
			t.Errorf("%d connections for 4 clients across %d hot restarts with hand-over; want 4", d, restarts)
		}
		if want := uint64(4 * restarts); moved != want || adopted != want {
			t.Errorf("moved %d, adopted %d connections; want %d each", moved, adopted, want)
		}
		if accepted != 5 { // the 4 clients and the gRPC connection
			t.Errorf("%d connections accepted; want 5", accepted)
		}
	} else if d, want := dials.Load(), int64(4*(restarts+1)); d != want {
		// Each client dials generation 1 once, and each next generation
		// once after the previous one's Connection: close; another dial
		// means a connection ended some other way.
		t.Errorf("%d connections for 4 clients across %d hot restarts; want %d", d, restarts, want)
	}
	var notMoved uint64
	st.Each(func(n string, x uint64) {
		if strings.HasPrefix(n, "meshlet_l7_drain_not_moved_total") {
			notMoved += x
		}
	})
	if notMoved != 0 {
		t.Errorf("meshlet_l7_drain_not_moved_total %d; want 0", notMoved)
	}
	if failed.Load() != 0 || ok.Load() < 20 || !sawV1 || !sawV2 {
		t.Fatalf("ok=%d failed=%d v1=%v v2=%v; want no failures and both configs served", ok.Load(), failed.Load(), sawV1, sawV2)
	}
}

// splitBackend serves HTTP/1.1 on a new loopback port until the test ends,
// answering each POST with its body and X-Backend: name, the head and the
// body in two writes with a pause between, so a proxy that ends a
// connection between a response's writes is caught.
func splitBackend(t testing.TB, name string) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				proctest.SplitHTTPAs(c.(*net.TCPConn), bufio.NewReader(c), name)
			}()
		}
	}()
	return ln.Addr().String()
}

// startGeneration starts a generation (generation server + L7 engine with
// config yaml) on its own descriptor of the shared listening socket, as the
// agent does; handover is its end of the hand-over socket from its
// predecessor, or nil. Every connection's original destination is the
// declared HTTP port 80.
func startGeneration(t testing.TB, shared *net.TCPListener, yaml string, st *stats.Region, handover *net.UnixConn) *server.Server {
	t.Helper()
	f, err := shared.File()
	if err != nil {
		t.Fatal(err)
	}
	fl, err := net.FileListener(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := config.ParseL7([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	engine, err := l7.New(cfg, l7.Options{AccessLog: io.Discard, Stats: st})
	if err != nil {
		t.Fatal(err)
	}
	var choose l4.Chooser
	srv, err := server.New(server.Options{
		Config:        config.Default(),
		Listeners:     server.Listeners{Outbound: []*net.TCPListener{fl.(*net.TCPListener)}},
		OrigDst:       func(*net.TCPConn) (netip.AddrPort, error) { return netip.MustParseAddrPort("127.0.0.1:80"), nil },
		Chooser:       func(c *l4.Conn) l4.Handler { return choose(c) },
		DrainDuration: 10 * time.Second,
		Stats:         st,
		Handover:      handover,
	})
	if err != nil {
		t.Fatal(err)
	}
	choose = engine.Chooser(srv.Forwarder())
	srv.Start()
	t.Cleanup(func() { srv.Close(); engine.Close() })
	return srv
}

// counter returns the value of the series name in st (0 when absent).
func counter(st *stats.Region, name string) (v uint64) {
	st.Each(func(n string, x uint64) {
		if n == name {
			v = x
		}
	})
	return v
}

// TestHotRestartHandOverFallback: when an HTTP/1.1 connection cannot move to
// the next generation — the successor takes L4 relays only, or it is gone
// so the send fails — the connection stays, its next request is answered
// with Connection: close, and the fallback is counted by its reason.
func TestHotRestartHandOverFallback(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, reason string
		successor    func(t *testing.T, end *net.UnixConn)
	}{
		{"successor takes L4 only", "successor_l4_only", func(t *testing.T, end *net.UnixConn) {
			if _, err := end.Write([]byte("meshlet-handover/1")); err != nil {
				t.Fatal(err)
			}
		}},
		{"successor gone", "send_failed", func(t *testing.T, end *net.UnixConn) {
			if _, err := l4.NewReceiver(end); err != nil {
				t.Fatal(err)
			}
			end.Close() // greeted, then died
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			shared := ln.(*net.TCPListener)
			defer shared.Close()
			st := stats.NewPrivate()
			g := startGeneration(t, shared, fmt.Sprintf(`
ports: [{port: 80, name: http-web}]
services: [{name: web, hosts: [web], routes: [{name: r, destinations: [{cluster: web}]}]}]
clusters: [{name: web, endpoints: [{address: %q}]}]
`, splitBackend(t, "v1")), st, nil)
			c, err := net.Dial("tcp", shared.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			br := bufio.NewReader(c)
			if resp, err := proctest.PostTo(c, br, "web", []byte("before"), false); err != nil || resp.Close {
				t.Fatalf("before the restart: %v", err)
			}
			oldEnd, newEnd := proctest.HandoverPair(t)
			tc.successor(t, newEnd)
			g.HandOver(oldEnd)
			time.Sleep(100 * time.Millisecond) // the drain reaches the idle connection
			resp, err := proctest.PostTo(c, br, "web", []byte("after"), false)
			if err != nil {
				t.Fatalf("after the drain began: %v", err)
			}
			if !resp.Close {
				t.Fatal("the response after a failed hand-over keeps the connection; want Connection: close")
			}
			if n := counter(st, `meshlet_l7_drain_not_moved_total{reason="`+tc.reason+`"}`); n != 1 {
				t.Errorf("meshlet_l7_drain_not_moved_total{reason=%q} %d; want 1", tc.reason, n)
			}
			if n := counter(st, `meshlet_proxy_handed_over_connections_total{direction="outbound"}`); n != 0 {
				t.Errorf("%d connections counted as handed over; want 0", n)
			}
		})
	}
}

// waitDrained fails the test if g does not finish draining.
func waitDrained(t *testing.T, g *server.Server, name string) {
	t.Helper()
	done := make(chan struct{})
	go func() { g.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatalf("%s did not finish draining", name)
	}
}

// rawClients are keep-alive HTTP/1.1 clients that never retry (net/http's
// client would silently send an idempotent request again on a new
// connection when a drain cut one): raw POSTs with a body for Host web,
// every attempt counted. A client dials again only after the proxy
// answered Connection: close (the codec's parsed response boundary); any
// other end of a connection is a failure, and ends that client.
type rawClients struct {
	stop              chan struct{}
	wg                sync.WaitGroup
	ok, failed, dials atomic.Int64
	seen              sync.Map // X-Backend values
}

func startRawClients(t *testing.T, addr string, n int) *rawClients {
	l := &rawClients{stop: make(chan struct{})}
	for w := range n {
		l.wg.Add(1)
		go func() {
			defer l.wg.Done()
			var c net.Conn
			var br *bufio.Reader
			defer func() {
				if c != nil {
					c.Close()
				}
			}()
			for i := 0; ; i++ {
				select {
				case <-l.stop:
					return
				default:
				}
				if c == nil {
					var err error
					if c, err = net.Dial("tcp", addr); err != nil {
						l.failed.Add(1)
						t.Errorf("client %d: dial: %v", w, err)
						return
					}
					l.dials.Add(1)
					br = bufio.NewReader(c)
				}
				resp, err := proctest.PostTo(c, br, "web", []byte(fmt.Sprintf("client %d request %d", w, i)), false)
				if err != nil {
					l.failed.Add(1)
					t.Errorf("client %d request %d: %v", w, i, err)
					return
				}
				l.seen.Store(resp.Header.Get("X-Backend"), true)
				l.ok.Add(1)
				if resp.Close {
					c.Close()
					c = nil
				}
			}
		}()
	}
	return l
}

// finish stops the clients and waits for them.
func (l *rawClients) finish() {
	close(l.stop)
	l.wg.Wait()
}

// TestHotRestartTwoSidecars: keep-alive clients → client-side sidecar (L7,
// routes web to the server-side sidecar) → server-side sidecar (L7, routes
// web to a backend writing head and body apart) → backend, while the two
// sidecars hot-restart alternately with hand-over. The server side moves
// the client side's pooled upstream connections like any other, the
// client side moves the clients': zero failures, each client dials once,
// nothing is left behind or ended by a drain on either side.
func TestHotRestartTwoSidecars(t *testing.T) {
	t.Parallel()
	listen := func() *net.TCPListener {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		return ln.(*net.TCPListener)
	}
	conf := func(dest string) string {
		return fmt.Sprintf(`
ports: [{port: 80, name: http-web}]
services: [{name: web, hosts: [web], routes: [{name: r, destinations: [{cluster: web}]}]}]
clusters: [{name: web, endpoints: [{address: %q}]}]
`, dest)
	}
	serverLn, clientLn := listen(), listen()
	serverSt, clientSt := stats.NewPrivate(), stats.NewPrivate()
	side := [2]struct {
		name string
		ln   *net.TCPListener
		st   *stats.Region
		conf string
		gen  *server.Server
	}{
		{"client side", clientLn, clientSt, conf(serverLn.Addr().String()), nil},
		{"server side", serverLn, serverSt, conf(splitBackend(t, "app")), nil},
	}
	for i := range side {
		side[i].gen = startGeneration(t, side[i].ln, side[i].conf, side[i].st, nil)
	}
	load := startRawClients(t, clientLn.Addr().String(), 4)
	const restarts = 6
	time.Sleep(200 * time.Millisecond)
	for r := range restarts {
		s := &side[r%2]
		oldEnd, newEnd := proctest.HandoverPair(t)
		next := startGeneration(t, s.ln, s.conf, s.st, newEnd)
		s.gen.HandOver(oldEnd)
		waitDrained(t, s.gen, fmt.Sprintf("%s, restart %d", s.name, r+1))
		s.gen = next
		time.Sleep(150 * time.Millisecond)
	}
	load.finish()
	t.Logf("requests ok=%d failed=%d dials=%d", load.ok.Load(), load.failed.Load(), load.dials.Load())
	if d := load.dials.Load(); d != 4 {
		t.Errorf("%d connections for 4 clients; want 4", d)
	}
	if load.failed.Load() != 0 || load.ok.Load() < 20 {
		t.Errorf("ok=%d failed=%d; want no failures", load.ok.Load(), load.failed.Load())
	}
	for _, s := range side {
		moved := counter(s.st, `meshlet_proxy_handed_over_connections_total{direction="outbound"}`)
		adopted := counter(s.st, `meshlet_proxy_adopted_connections_total{direction="outbound"}`)
		accepted := counter(s.st, `meshlet_proxy_connections_total{direction="outbound"}`)
		closed := counter(s.st, `meshlet_proxy_drain_closed_connections_total{direction="outbound"}`)
		var notMoved uint64
		s.st.Each(func(n string, x uint64) {
			if strings.HasPrefix(n, "meshlet_l7_drain_not_moved_total") {
				notMoved += x
			}
		})
		t.Logf("%s: accepted %d, moved %d, adopted %d", s.name, accepted, moved, adopted)
		if moved != adopted || moved < 3*4 || closed != 0 || notMoved != 0 {
			t.Errorf("%s: moved %d, adopted %d, closed by a drain %d, not moved %d; want every connection moved at each of its 3 restarts",
				s.name, moved, adopted, closed, notMoved)
		}
	}
	if a := counter(clientSt, `meshlet_proxy_connections_total{direction="outbound"}`); a != 4 {
		t.Errorf("client side accepted %d connections; want the 4 clients'", a)
	}
}
