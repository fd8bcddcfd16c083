package l7_test

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	testpb "google.golang.org/grpc/interop/grpc_testing"

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

// TestHotRestartConfigChangeLosesNothing: constant HTTP/1.1 load plus a gRPC
// bidi stream open across a generation switch that changes the routing
// config. No request fails, the stream finishes on the old generation, and
// new requests see the new config.
func TestHotRestartConfigChangeLosesNothing(t *testing.T) {
	t.Parallel()
	// Backends: HTTP (v1, v2) and gRPC.
	httpBackend := func(name string) string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		s := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("X-Backend", name)
			io.WriteString(w, name)
		})}
		go s.Serve(ln)
		t.Cleanup(func() { s.Close() })
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

	// Constant load: 4 keep-alive clients.
	stop := make(chan struct{})
	var ok, failed atomic.Int64
	var seen sync.Map
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c := &http.Client{Timeout: 5 * time.Second}
			for {
				select {
				case <-stop:
					return
				default:
				}
				req, _ := http.NewRequest(http.MethodGet, "http://"+shared.Addr().String()+"/", nil)
				req.Host = "web"
				resp, err := c.Do(req)
				if err != nil {
					failed.Add(1)
					t.Logf("request failed: %v", err)
					continue
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					failed.Add(1)
					continue
				}
				seen.Store(resp.Header.Get("X-Backend"), true)
				ok.Add(1)
			}
		}()
	}
	time.Sleep(200 * time.Millisecond)
	// Hot restart with a changed config: generation 2 routes web to v2.
	gen(conf(v2))
	gen1.Drain(server.HotRestart)
	for i := 1; i <= 10; i++ { // the stream keeps working on generation 1
		echo(i)
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	close(stop)
	wg.Wait()
	stream.CloseSend()
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("stream end: %v", err)
	}
	done := make(chan struct{})
	go func() { gen1.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("generation 1 did not finish draining")
	}
	_, sawV1 := seen.Load("v1")
	_, sawV2 := seen.Load("v2")
	t.Logf("requests ok=%d failed=%d (v1 seen %v, v2 seen %v)", ok.Load(), failed.Load(), sawV1, sawV2)
	if failed.Load() != 0 || ok.Load() < 20 || !sawV1 || !sawV2 {
		t.Fatalf("ok=%d failed=%d v1=%v v2=%v; want no failures and both configs served", ok.Load(), failed.Load(), sawV1, sawV2)
	}
}
