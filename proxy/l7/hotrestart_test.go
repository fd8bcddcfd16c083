package l7_test

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
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
// config. No request fails, no connection ends but at a Connection: close,
// the stream finishes on the first generation, and new requests see the
// new config.
func TestHotRestartConfigChangeLosesNothing(t *testing.T) {
	t.Parallel()
	// Backends: HTTP (v1, v2) and gRPC. The HTTP backends write each
	// response's head and body apart with a pause between, so a proxy that
	// ends a connection between a response's writes is caught.
	httpBackend := func(name string) string {
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
	v1, v2 := httpBackend("v1"), httpBackend("v2")
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
	// gen starts a generation (generation server + L7 engine) on its own
	// descriptor of the shared listening socket, as the agent does.
	gen := func(yaml string) *server.Server {
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
		engine, err := l7.New(cfg, l7.Options{AccessLog: io.Discard})
		if err != nil {
			t.Fatal(err)
		}
		var choose l4.Chooser
		srv, err := server.New(server.Options{
			Config:    config.Default(),
			Listeners: server.Listeners{Outbound: []*net.TCPListener{fl.(*net.TCPListener)}},
			// Every connection's original destination is a declared HTTP port;
			// routing is by authority (web, echo).
			OrigDst:       func(*net.TCPConn) (netip.AddrPort, error) { return netip.MustParseAddrPort("127.0.0.1:80"), nil },
			Chooser:       func(c *l4.Conn) l4.Handler { return choose(c) },
			DrainDuration: 10 * time.Second,
		})
		if err != nil {
			t.Fatal(err)
		}
		choose = engine.Chooser(srv.Forwarder())
		srv.Start()
		t.Cleanup(func() { srv.Close(); engine.Close() })
		return srv
	}
	gen1 := gen(conf(v1))

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

	// Constant load: 4 keep-alive clients that never retry (net/http's
	// client would silently send an idempotent request again on a new
	// connection when the drain cut one): raw POSTs with a body, every
	// attempt counted. A client dials again only after the proxy answered
	// Connection: close (the codec's parsed response boundary); any other
	// end of a connection is a failure.
	stop := make(chan struct{})
	var ok, failed, dials atomic.Int64
	var seen sync.Map
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var c net.Conn
			var br *bufio.Reader
			defer func() {
				if c != nil {
					c.Close()
				}
			}()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				if c == nil {
					var err error
					if c, err = net.Dial("tcp", shared.Addr().String()); err != nil {
						failed.Add(1)
						t.Errorf("client %d: dial: %v", w, err)
						return
					}
					dials.Add(1)
					br = bufio.NewReader(c)
				}
				resp, err := proctest.PostTo(c, br, "web", []byte(fmt.Sprintf("client %d request %d", w, i)), false)
				if err != nil {
					failed.Add(1)
					t.Errorf("client %d request %d: %v", w, i, err)
					return
				}
				seen.Store(resp.Header.Get("X-Backend"), true)
				ok.Add(1)
				if resp.Close {
					c.Close()
					c = nil
				}
			}
		}()
	}
	// waitDrained fails the test if g does not finish draining.
	waitDrained := func(g *server.Server, name string) {
		done := make(chan struct{})
		go func() { g.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatalf("%s did not finish draining", name)
		}
	}
	// Hot restarts, each with a changed config: even generations route web
	// to v2, odd ones to v1. Every restart is a chance for the drain to cut
	// a keep-alive connection between two of its requests.
	const restarts = 4
	time.Sleep(200 * time.Millisecond)
	prev := gen1
	for r := 1; r <= restarts; r++ {
		next := gen(conf([]string{v1, v2}[r%2]))
		prev.Drain(server.HotRestart)
		for i := 1; i <= 10; i++ { // the stream keeps working on generation 1
			echo(10*r + i)
			time.Sleep(20 * time.Millisecond)
		}
		if prev != gen1 {
			waitDrained(prev, fmt.Sprint("generation ", r))
		}
		prev = next
	}
	close(stop)
	wg.Wait()
	stream.CloseSend()
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("stream end: %v", err)
	}
	waitDrained(gen1, "generation 1")
	_, sawV1 := seen.Load("v1")
	_, sawV2 := seen.Load("v2")
	t.Logf("requests ok=%d failed=%d dials=%d (v1 seen %v, v2 seen %v)", ok.Load(), failed.Load(), dials.Load(), sawV1, sawV2)
	// Each client dials generation 1 once, and each next generation once
	// after the previous one's Connection: close; another dial means a
	// connection ended some other way.
	if d, want := dials.Load(), int64(4*(restarts+1)); d != want {
		t.Errorf("%d connections for 4 clients across %d hot restarts; want %d", d, restarts, want)
	}
	if failed.Load() != 0 || ok.Load() < 20 || !sawV1 || !sawV2 {
		t.Fatalf("ok=%d failed=%d v1=%v v2=%v; want no failures and both configs served", ok.Load(), failed.Load(), sawV1, sawV2)
	}
}
