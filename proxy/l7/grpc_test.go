package l7

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
)

// echoServer is grpc-go's interop TestService, answering from the request.
type echoServer struct {
	testpb.UnimplementedTestServiceServer
	name         string
	calls        atomic.Int64
	lastDeadline atomic.Int64 // remaining time (ns) seen by the last UnaryCall
}

func (s *echoServer) UnaryCall(ctx context.Context, in *testpb.SimpleRequest) (*testpb.SimpleResponse, error) {
	s.calls.Add(1)
	if dl, ok := ctx.Deadline(); ok {
		s.lastDeadline.Store(int64(time.Until(dl)))
	} else {
		s.lastDeadline.Store(-1)
	}
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("sleep-ms"); len(v) > 0 {
		ms, _ := strconv.Atoi(v[0])
		select {
		case <-time.After(time.Duration(ms) * time.Millisecond):
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if v := md.Get("fail-code"); len(v) > 0 {
		n, _ := strconv.Atoi(v[0])
		grpc.SetTrailer(ctx, metadata.Pairs("x-detail", "from-"+s.name))
		return nil, status.Error(codes.Code(n), "asked to fail")
	}
	grpc.SetTrailer(ctx, metadata.Pairs("x-served-by", s.name))
	return &testpb.SimpleResponse{Payload: in.GetPayload(), Username: s.name}, nil
}

func (s *echoServer) StreamingOutputCall(in *testpb.StreamingOutputCallRequest, stream grpc.ServerStreamingServer[testpb.StreamingOutputCallResponse]) error {
	for i, p := range in.GetResponseParameters() {
		if err := stream.Send(&testpb.StreamingOutputCallResponse{Payload: &testpb.Payload{Body: make([]byte, p.GetSize())}}); err != nil {
			return err
		}
		_ = i
	}
	return nil
}

func (s *echoServer) FullDuplexCall(stream grpc.BidiStreamingServer[testpb.StreamingOutputCallRequest, testpb.StreamingOutputCallResponse]) error {
	for {
		in, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		if err := stream.Send(&testpb.StreamingOutputCallResponse{Payload: in.GetPayload()}); err != nil {
			return err
		}
	}
}

func startGRPC(t testing.TB, name string) (*echoServer, string, *health.Server) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	es := &echoServer{name: name}
	testpb.RegisterTestServiceServer(s, es)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(s, hs)
	go s.Serve(ln)
	t.Cleanup(s.Stop)
	return es, ln.Addr().String(), hs
}

func grpcConn(t testing.TB, addr, authority string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority(authority))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func TestGRPCThroughProxy(t *testing.T) {
	t.Parallel()
	es, addr, hs := startGRPC(t, "echo-1")
	cfg := mustLoad(t, fmt.Sprintf(`
ports: [{port: 7070, name: grpc-echo}]
services:
- name: echo
  hosts: [echo]
  routes:
  - name: slow
    match: [{uri: {exact: /grpc.testing.TestService/UnaryCall}, headers: {x-slow-route: {present: true}}}]
    timeout: 100ms
    destinations: [{cluster: echo}]
  - name: fault
    match: [{headers: {x-fault: {exact: "1"}}}]
    fault: {abort: {grpcStatus: 8, percent: 100}}
    destinations: [{cluster: echo}]
  - name: default
    destinations: [{cluster: echo}]
clusters:
- name: echo
  protocol: http2
  endpoints: [{address: %q}]
`, addr))
	for _, tc := range []struct{ engine, port string }{ // declared grpc, and detected; both HTTP/2 engines
		{config.H2Frames, "7070"}, {config.H2Frames, "7071"}, {config.H2NetHTTP, "7070"}, {config.H2NetHTTP, "7071"},
	} {
		port := tc.port
		t.Run(tc.engine+"/port"+port, func(t *testing.T) {
			cfg := cfg
			cfg.HTTP2Forwarder = tc.engine
			tp := startProxy(t, cfg, "127.0.0.1:"+port, l4.Outbound)
			defer requireEngine(t, tp, tc.engine)
			cc := grpcConn(t, tp.addr, "echo")
			ctx := t.Context()

			// Health service.
			hs.SetServingStatus("grpc.testing.TestService", healthpb.HealthCheckResponse_SERVING)
			hr, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{Service: "grpc.testing.TestService"})
			if err != nil || hr.GetStatus() != healthpb.HealthCheckResponse_SERVING {
				t.Fatalf("health: %v %v", hr, err)
			}
			tc := testpb.NewTestServiceClient(cc)

			// Unary with trailers.
			var tr metadata.MD
			r, err := tc.UnaryCall(ctx, &testpb.SimpleRequest{Payload: &testpb.Payload{Body: []byte("hi")}}, grpc.Trailer(&tr))
			if err != nil || string(r.GetPayload().GetBody()) != "hi" || r.GetUsername() != "echo-1" {
				t.Fatalf("unary: %v %v", r, err)
			}
			if got := tr.Get("x-served-by"); len(got) != 1 || got[0] != "echo-1" {
				t.Fatalf("trailer x-served-by = %v", got)
			}
			// Error status and trailer metadata pass through.
			_, err = tc.UnaryCall(metadata.AppendToOutgoingContext(ctx, "fail-code", "7"), &testpb.SimpleRequest{}, grpc.Trailer(&tr))
			if status.Code(err) != codes.PermissionDenied || tr.Get("x-detail")[0] != "from-echo-1" {
				t.Fatalf("error passthrough: %v %v", err, tr)
			}

			// Server streaming.
			ss, err := tc.StreamingOutputCall(ctx, &testpb.StreamingOutputCallRequest{ResponseParameters: []*testpb.ResponseParameters{{Size: 10}, {Size: 70000}, {Size: 3}}})
			if err != nil {
				t.Fatal(err)
			}
			if sizes := streamSizes(t, ss); fmt.Sprint(sizes) != "[10 70000 3]" {
				t.Fatalf("server stream sizes %v", sizes)
			}

			// Bidi: each response arrives before the next request is sent (true streaming both ways).
			bs, err := tc.FullDuplexCall(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 20; i++ {
				bidiRoundTrip(t, bs, fmt.Sprintf("m%d", i))
			}
			bs.CloseSend()
			if _, err := bs.Recv(); !errors.Is(err, io.EOF) {
				t.Fatalf("bidi end: %v", err)
			}

			// Client deadline propagates: the server sees at most the client's budget
			// and the client gets DEADLINE_EXCEEDED on time.
			dctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
			_, err = tc.UnaryCall(dctx, &testpb.SimpleRequest{})
			cancel()
			if err != nil {
				t.Fatal(err)
			}
			if dl := time.Duration(es.lastDeadline.Load()); dl <= 0 || dl > 300*time.Millisecond {
				t.Fatalf("server-side deadline %v; want (0, 300ms]", dl)
			}
			dctx, cancel = context.WithTimeout(ctx, 150*time.Millisecond)
			start := time.Now()
			_, err = tc.UnaryCall(metadata.AppendToOutgoingContext(dctx, "sleep-ms", "5000"), &testpb.SimpleRequest{})
			cancel()
			if status.Code(err) != codes.DeadlineExceeded || time.Since(start) > 4*time.Second {
				t.Fatalf("client deadline: %v after %v", err, time.Since(start))
			}

			// Route timeout (100ms) is enforced by the proxy as DEADLINE_EXCEEDED.
			start = time.Now()
			_, err = tc.UnaryCall(metadata.AppendToOutgoingContext(ctx, "sleep-ms", "5000", "x-slow-route", "1"), &testpb.SimpleRequest{})
			if status.Code(err) != codes.DeadlineExceeded || time.Since(start) > 4*time.Second {
				t.Fatalf("route timeout: %v after %v", err, time.Since(start))
			}

			// Fault abort with a gRPC code.
			_, err = tc.UnaryCall(metadata.AppendToOutgoingContext(ctx, "x-fault", "1"), &testpb.SimpleRequest{})
			if status.Code(err) != codes.ResourceExhausted {
				t.Fatalf("fault abort: %v", err)
			}
		})
	}
}

// A gRPC health check (grpc.health.v1 Check over h2c, against grpc-go's
// health server) takes an endpoint out of rotation while its service is
// NOT_SERVING and back when it is SERVING again.
func TestGRPCHealthCheck(t *testing.T) {
	t.Parallel()
	_, addrA, hsA := startGRPC(t, "a")
	esB, addrB, hsB := startGRPC(t, "b")
	hsA.SetServingStatus("echo", healthpb.HealthCheckResponse_SERVING)
	hsB.SetServingStatus("echo", healthpb.HealthCheckResponse_NOT_SERVING)
	hsB.SetServingStatus("", healthpb.HealthCheckResponse_SERVING) // only the named service is down
	cfg := mustLoad(t, fmt.Sprintf(`
services:
- name: echo
  hosts: [echo]
  routes: [{name: r, destinations: [{cluster: echo}]}]
clusters:
- name: echo
  protocol: http2
  endpoints: [{address: %q}, {address: %q}]
  healthCheck: {type: grpc, serviceName: echo, interval: 50ms, timeout: 1s, unhealthyThreshold: 1, healthyThreshold: 2}
`, addrA, addrB))
	tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	b := tp.tab.Load().clusters["echo"].Endpoints()[1]
	waitUntil(t, func() bool { return b.Unhealthy() })
	tc := testpb.NewTestServiceClient(grpcConn(t, tp.addr, "echo"))
	calls := func(n int) map[string]int {
		seen := map[string]int{}
		for i := 0; i < n; i++ {
			resp, err := tc.UnaryCall(t.Context(), &testpb.SimpleRequest{})
			if err != nil {
				t.Fatalf("call %d: %v", i, err)
			}
			seen[resp.GetUsername()]++
		}
		return seen
	}
	if seen := calls(20); seen["b"] != 0 || seen["a"] != 20 {
		t.Fatalf("while b is NOT_SERVING: %v; want all 20 on a", seen)
	}
	before := esB.calls.Load()
	hsB.SetServingStatus("echo", healthpb.HealthCheckResponse_SERVING)
	waitUntil(t, func() bool { return !b.Unhealthy() })
	if seen := calls(20); seen["b"] == 0 || esB.calls.Load() == before {
		t.Fatalf("b SERVING again but got no calls: %v", seen)
	}
	// SERVICE_UNKNOWN is not SERVING either.
	hsB.SetServingStatus("echo", healthpb.HealthCheckResponse_SERVICE_UNKNOWN)
	waitUntil(t, func() bool { return b.Unhealthy() })
}

// bidiRoundTrip sends msg on a FullDuplexCall stream and requires its echo
// before anything else is sent (true streaming both ways).
func bidiRoundTrip(t testing.TB, bs grpc.BidiStreamingClient[testpb.StreamingOutputCallRequest, testpb.StreamingOutputCallResponse], msg string) {
	t.Helper()
	if err := bs.Send(&testpb.StreamingOutputCallRequest{Payload: &testpb.Payload{Body: []byte(msg)}}); err != nil {
		t.Fatalf("send %q: %v", msg, err)
	}
	got, err := bs.Recv()
	if err != nil || string(got.GetPayload().GetBody()) != msg {
		t.Fatalf("echo of %q: %v %v", msg, got, err)
	}
}

// streamSizes reads a server stream to its end and returns the sizes of
// the messages it carried.
func streamSizes(t testing.TB, ss grpc.ServerStreamingClient[testpb.StreamingOutputCallResponse]) []int {
	t.Helper()
	var sizes []int
	for {
		m, err := ss.Recv()
		if errors.Is(err, io.EOF) {
			return sizes
		}
		if err != nil {
			t.Fatal(err)
		}
		sizes = append(sizes, len(m.GetPayload().GetBody()))
	}
}
