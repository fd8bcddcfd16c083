package l7

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
)

// requireEngine checks which HTTP/2 engine served the proxy's connections.
func requireEngine(t testing.TB, tp *testProxy, engine string) {
	t.Helper()
	n := tp.h2.served.Load()
	if engine == config.H2Frames && n == 0 {
		t.Errorf("no connection went through the frame forwarder")
	}
	if engine == config.H2NetHTTP && n != 0 {
		t.Errorf("%d connections went through the frame forwarder; want net/http", n)
	}
}

// framesProxy starts a proxy with the frame forwarder on.
func framesProxy(t testing.TB, cfg config.L7, dst string, dir l4.Direction) *testProxy {
	t.Helper()
	cfg.HTTP2Forwarder = config.H2Frames
	tp := startProxy(t, cfg, dst, dir)
	t.Cleanup(func() { requireEngine(t, tp, config.H2Frames) })
	return tp
}

func routedTo(t testing.TB, addr, extra string) config.L7 {
	return mustLoad(t, fmt.Sprintf(`
services:
- name: echo
  hosts: [echo]
  routes: [{name: r, destinations: [{cluster: echo}]%s}]
clusters:
- name: echo
  protocol: http2
  endpoints: [{address: %q}]
`, extra, addr))
}

// Ports whose routes need what the forwarder lacks stay on net/http.
func TestH2FramesGating(t *testing.T) {
	t.Parallel()
	cfg := mustLoad(t, `
http2Forwarder: frames
services:
- name: plain
  hosts: [plain]
  ports: [{port: 81}]
  routes: [{name: r, destinations: [{cluster: h2}]}]
- name: mirrored
  hosts: [m]
  ports: [{port: 82}]
  routes: [{name: r, destinations: [{cluster: h2}], mirror: {cluster: h2}}]
- name: h1
  hosts: [h1]
  ports: [{port: 83}]
  routes: [{name: r, destinations: [{cluster: h1}]}]
- name: limited
  hosts: [l]
  ports: [{port: 84}]
  routes: [{name: r, destinations: [{cluster: limited}]}]
- name: tls
  hosts: [t]
  ports: [{port: 85}]
  routes: [{name: r, destinations: [{cluster: tls}]}]
clusters:
- {name: h2, protocol: http2, endpoints: [{address: "127.0.0.1:1"}]}
- {name: h1, protocol: http1, endpoints: [{address: "127.0.0.1:1"}]}
- {name: limited, endpoints: [{address: "127.0.0.1:1"}], connectionPool: {maxConnections: 4}}
- {name: tls, protocol: http2, endpoints: [{address: "127.0.0.1:1"}], tls: {mode: SIMPLE, insecureSkipVerify: true}}
`)
	p, err := New(cfg, Options{AccessLog: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	for port, want := range map[uint16]bool{81: true, 82: false, 83: false, 84: false, 85: false, 9999: true} {
		if got := p.h2Serves(port, l4.Outbound); got != want {
			t.Errorf("port %d: frames=%v, want %v", port, got, want)
		}
	}
	if !p.h2Serves(82, l4.Inbound) {
		t.Error("inbound is always served by the frame forwarder")
	}
	cfg.HTTP2Forwarder = config.H2NetHTTP
	p2, err := New(cfg, Options{AccessLog: io.Discard})
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	if p2.h2Serves(81, l4.Outbound) || p2.h2Serves(81, l4.Inbound) {
		t.Error("http2Forwarder: nethttp still uses the frame forwarder")
	}
	if _, err := config.ParseL7([]byte("http2Forwarder: fast\n")); err == nil || !strings.Contains(err.Error(), `http2Forwarder: "fast"`) {
		t.Errorf("bad http2Forwarder: %v", err)
	}
}

// Messages larger than every window (3 MiB each way), through two hops, so
// flow control on both sides of both proxies is exercised.
func TestH2FramesLargeMessagesTwoHops(t *testing.T) {
	t.Parallel()
	_, addr, _ := startGRPC(t, "echo")
	server := framesProxy(t, config.L7{}, addr, l4.Inbound)
	client := framesProxy(t, routedTo(t, server.addr, ""), "127.0.0.1:80", l4.Outbound)
	tc := testpb.NewTestServiceClient(grpcConn(t, client.addr, "echo"))
	big := bytes.Repeat([]byte("0123456789abcdef"), 3<<20/16)
	var wg sync.WaitGroup
	for i := range 4 { // concurrent streams share the connection windows
		wg.Add(1)
		go func() {
			defer wg.Done()
			body := append([]byte{byte(i)}, big...)
			r, err := tc.UnaryCall(t.Context(), &testpb.SimpleRequest{Payload: &testpb.Payload{Body: body}})
			if err != nil || !bytes.Equal(r.GetPayload().GetBody(), body) {
				t.Errorf("unary %d: %v (got %d bytes)", i, err, len(r.GetPayload().GetBody()))
			}
		}()
	}
	wg.Wait()
	ss, err := tc.StreamingOutputCall(t.Context(), &testpb.StreamingOutputCallRequest{ResponseParameters: []*testpb.ResponseParameters{{Size: 2 << 20}, {Size: 1}, {Size: 3 << 20}}})
	if err != nil {
		t.Fatal(err)
	}
	if sizes := streamSizes(t, ss); fmt.Sprint(sizes) != fmt.Sprint([]int{2 << 20, 1, 3 << 20}) {
		t.Fatalf("stream sizes %v", sizes)
	}
}

// Plain h2c requests with bodies (not gRPC) go through with their status,
// headers and body.
func TestH2FramesH2CBodies(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Method", r.Method)
		w.Header().Set("Trailer", "X-Got-Trailer")
		w.WriteHeader(http.StatusCreated)
		io.Copy(w, r.Body)
		w.Header().Set("X-Got-Trailer", r.Trailer.Get("X-Req-Trailer")) // request trailers arrive after the body
	})
	tp := framesProxy(t, config.L7{}, be.addr, l4.Outbound)
	c := h2cClient()
	body := bytes.Repeat([]byte("b"), 1500<<10)
	req, _ := http.NewRequest(http.MethodPut, "http://"+tp.addr+"/up", bytes.NewReader(body))
	req.Host = "app"
	req.Trailer = http.Header{"X-Req-Trailer": {"t1"}}
	req.ContentLength = -1
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err != nil || resp.StatusCode != http.StatusCreated || resp.Header.Get("X-Method") != "PUT" ||
		resp.Header.Get("X-Proto") != "HTTP/2.0" || !bytes.Equal(got, body) {
		t.Fatalf("PUT: %v status %d headers %v, %d bytes back", err, resp.StatusCode, resp.Header, len(got))
	}
	if v := resp.Trailer.Get("X-Got-Trailer"); v != "t1" {
		t.Fatalf("request trailer seen upstream %q, response trailers %v; want t1 both ways", v, resp.Trailer)
	}
	if code, _, b := get(t, c, tp.addr, "app", "/x"); code != http.StatusCreated || b != "" {
		t.Fatalf("GET: %d %q", code, b)
	}
}

// cancelServer reports when a call's context ends on the server.
type cancelServer struct {
	testpb.UnimplementedTestServiceServer
	started, cancelled chan struct{}
}

func (s *cancelServer) UnaryCall(ctx context.Context, _ *testpb.SimpleRequest) (*testpb.SimpleResponse, error) {
	s.started <- struct{}{}
	select {
	case <-ctx.Done():
		s.cancelled <- struct{}{}
		return nil, ctx.Err()
	case <-time.After(10 * time.Second):
		return &testpb.SimpleResponse{}, nil
	}
}

// A client's RST_STREAM (cancelled call) cancels the upstream stream: the
// server sees its context end.
func TestH2FramesClientCancelReachesUpstream(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &cancelServer{started: make(chan struct{}, 1), cancelled: make(chan struct{}, 1)}
	gs := grpc.NewServer()
	testpb.RegisterTestServiceServer(gs, srv)
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)
	tp := framesProxy(t, config.L7{}, ln.Addr().String(), l4.Outbound)
	tc := testpb.NewTestServiceClient(grpcConn(t, tp.addr, "echo"))
	ctx, cancel := context.WithCancel(t.Context())
	errc := make(chan error, 1)
	go func() {
		_, err := tc.UnaryCall(ctx, &testpb.SimpleRequest{})
		errc <- err
	}()
	<-srv.started
	cancel()
	if err := <-errc; status.Code(err) != codes.Canceled {
		t.Fatalf("client: %v", err)
	}
	select {
	case <-srv.cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("the server's call was not cancelled after the client reset its stream")
	}
}

// An upstream RST_STREAM reaches the client: as 502 before the response
// started, as a stream reset after.
func TestH2FramesUpstreamReset(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/late" {
			w.WriteHeader(200)
			io.WriteString(w, "partial")
			w.(http.Flusher).Flush()
			time.Sleep(50 * time.Millisecond)
		}
		panic(http.ErrAbortHandler) // net/http resets the stream
	})
	tp := framesProxy(t, config.L7{}, be.addr, l4.Outbound)
	c := h2cClient()
	if code, _, _ := get(t, c, tp.addr, "app", "/early"); code != http.StatusBadGateway {
		t.Fatalf("reset before headers: %d, want 502", code)
	}
	req, _ := http.NewRequest(http.MethodGet, "http://"+tp.addr+"/late", nil)
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(resp.Body)
	resp.Body.Close()
	if err == nil || string(b) != "partial" {
		t.Fatalf("reset after headers: body %q err %v; want the partial body and a stream error", b, err)
	}
	var se http2.StreamError
	if !errors.As(err, &se) && !strings.Contains(err.Error(), "stream error") {
		t.Fatalf("want a stream error, got %v", err)
	}
}

// Drain during 16 in-flight calls: all of them complete, Drain returns.
func TestH2FramesDrainNoLoss(t *testing.T) {
	t.Parallel()
	es, addr, _ := startGRPC(t, "echo")
	tp := framesProxy(t, config.L7{}, addr, l4.Outbound)
	cc := grpcConn(t, tp.addr, "echo")
	tc := testpb.NewTestServiceClient(cc)
	const n = 16
	errc := make(chan error, n)
	for range n {
		go func() {
			_, err := tc.UnaryCall(metadata.AppendToOutgoingContext(t.Context(), "sleep-ms", "300"), &testpb.SimpleRequest{})
			errc <- err
		}()
	}
	waitUntil(t, func() bool { return es.calls.Load() == n })
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	if err := tp.Drain(ctx); err != nil {
		t.Fatalf("Drain: %v", err)
	}
	for range n {
		if err := <-errc; err != nil {
			t.Errorf("in-flight call lost in drain: %v", err)
		}
	}
}

// gRPC local replies: no route is UNIMPLEMENTED, a full circuit breaker
// UNAVAILABLE, a grpc-timeout shorter than the route's DEADLINE_EXCEEDED.
func TestH2FramesLocalReplies(t *testing.T) {
	t.Parallel()
	_, addr, _ := startGRPC(t, "echo")
	cfg := mustLoad(t, fmt.Sprintf(`
services:
- name: echo
  hosts: [echo]
  routes: [{name: r, match: [{uri: {prefix: /grpc.testing.TestService/UnaryCall}}], destinations: [{cluster: echo}], timeout: 10s}]
clusters:
- name: echo
  protocol: http2
  endpoints: [{address: %q}]
  connectionPool: {maxRequests: 1}
accessLog: {enabled: true}
`, addr))
	tp := framesProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	tc := testpb.NewTestServiceClient(grpcConn(t, tp.addr, "echo"))
	ctx := t.Context()
	if _, err := tc.EmptyCall(ctx, &testpb.Empty{}); status.Code(err) != codes.Unimplemented || !strings.Contains(err.Error(), "no route") {
		t.Fatalf("no route: %v", err)
	}
	done := make(chan error, 1)
	go func() {
		_, err := tc.UnaryCall(metadata.AppendToOutgoingContext(ctx, "sleep-ms", "500"), &testpb.SimpleRequest{})
		done <- err
	}()
	waitUntil(t, func() bool { return tp.tab.Load().clusters["echo"].Active() == 1 })
	if _, err := tc.UnaryCall(ctx, &testpb.SimpleRequest{}); status.Code(err) != codes.Unavailable {
		t.Fatalf("overflow: %v", err)
	}
	if err := <-done; err != nil {
		t.Fatalf("the call holding the slot: %v", err)
	}
	dctx, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if _, err := tc.UnaryCall(metadata.AppendToOutgoingContext(dctx, "sleep-ms", "3000"), &testpb.SimpleRequest{}); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("grpc-timeout: %v", err)
	}
	if !strings.Contains(tp.log.String(), `"flags":"NR"`) || !strings.Contains(tp.log.String(), `"flags":"UO"`) {
		t.Errorf("access log lacks NR/UO flags:\n%s", tp.log.String())
	}
}

// failingServer answers every call UNAVAILABLE.
type failingServer struct {
	testpb.UnimplementedTestServiceServer
}

func (failingServer) UnaryCall(context.Context, *testpb.SimpleRequest) (*testpb.SimpleResponse, error) {
	return nil, status.Error(codes.Unavailable, "down")
}

// Retries: with one of two endpoints failing UNAVAILABLE, every call
// succeeds on the retry (the request is replayed to the other endpoint).
func TestH2FramesRetries(t *testing.T) {
	t.Parallel()
	_, good, _ := startGRPC(t, "good")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer()
	testpb.RegisterTestServiceServer(gs, failingServer{})
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)
	cfg := mustLoad(t, fmt.Sprintf(`
services:
- name: echo
  hosts: [echo]
  routes: [{name: r, destinations: [{cluster: echo}], retries: {attempts: 2, retryOn: [unavailable], baseInterval: 1ms}}]
clusters:
- name: echo
  protocol: http2
  endpoints: [{address: %q}, {address: %q}]
accessLog: {enabled: true}
`, good, ln.Addr().String()))
	tp := framesProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	tc := testpb.NewTestServiceClient(grpcConn(t, tp.addr, "echo"))
	body := bytes.Repeat([]byte("r"), 20000)
	for i := range 10 {
		r, err := tc.UnaryCall(t.Context(), &testpb.SimpleRequest{Payload: &testpb.Payload{Body: body}})
		if err != nil || !bytes.Equal(r.GetPayload().GetBody(), body) {
			t.Fatalf("call %d: %v", i, err)
		}
	}
	if !strings.Contains(tp.log.String(), `"attempts":2`) {
		t.Errorf("no retried call in the access log:\n%s", tp.log.String())
	}
}

// rawStatus is a response HEADERS frame's status, as rawH2 reports it.
type rawStatus struct {
	http2.Frame
	status string
}

// rawH2 opens a raw HTTP/2 connection to the proxy and reads frames in the
// background.
type rawH2 struct {
	c      net.Conn
	fr     *http2.Framer
	frames chan http2.Frame
	enc    *hpack.Encoder
	hb     bytes.Buffer
}

func dialRawH2(t testing.TB, addr string) *rawH2 {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	r := &rawH2{c: c, fr: h2Handshake(t, c), frames: make(chan http2.Frame, 1<<16)}
	r.enc = hpack.NewEncoder(&r.hb)
	go func() {
		defer close(r.frames)
		for {
			f, err := r.fr.ReadFrame()
			if err != nil {
				return
			}
			switch f := f.(type) { // copy what the tests look at
			case *http2.GoAwayFrame:
				r.frames <- &http2.GoAwayFrame{LastStreamID: f.LastStreamID, ErrCode: f.ErrCode}
			case *http2.RSTStreamFrame:
				r.frames <- &http2.RSTStreamFrame{FrameHeader: f.FrameHeader, ErrCode: f.ErrCode}
			case *http2.MetaHeadersFrame:
				r.frames <- &rawStatus{status: f.PseudoValue("status")}
			}
		}
	}()
	return r
}

func (r *rawH2) headers(t testing.TB, id uint32, end bool) {
	t.Helper()
	r.hb.Reset()
	for _, kv := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":authority", "app"}, {":path", "/"}} {
		r.enc.WriteField(hpack.HeaderField{Name: kv[0], Value: kv[1]})
	}
	if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: r.hb.Bytes(), EndStream: end, EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
}

// goAway waits for a GOAWAY and returns its code; ok is false when the
// connection ended without one.
func (r *rawH2) goAway(t testing.TB) (http2.ErrCode, bool) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		select {
		case f, open := <-r.frames:
			if !open {
				return 0, false
			}
			if ga, ok := f.(*http2.GoAwayFrame); ok {
				return ga.ErrCode, true
			}
		case <-timeout:
			t.Fatal("no GOAWAY within 10s")
		}
	}
}

// Rapid reset (CVE-2023-44487): a client that cancels streams as fast as
// it opens them gets GOAWAY(ENHANCE_YOUR_CALM) and the connection closes.
func TestH2FramesRapidResetGoAway(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(time.Second):
		case <-r.Context().Done():
		}
	})
	tp := framesProxy(t, config.L7{}, be.addr, l4.Outbound)
	r := dialRawH2(t, tp.addr)
	for i := 0; i < 1000; i++ {
		id := uint32(2*i + 1)
		if err := h2RequestErr(r.fr, id, "/", false); err != nil {
			break // the proxy hung up: expected
		}
		if err := r.fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
			break // the proxy hung up: expected
		}
	}
	if code, ok := r.goAway(t); !ok || code != http2.ErrCodeEnhanceYourCalm {
		t.Fatalf("GOAWAY %v (seen %v); want ENHANCE_YOUR_CALM", code, ok)
	}
	// The proxy keeps serving others.
	if code, _, _ := get(t, h2cClient(), tp.addr, "app", "/"); code != 200 {
		t.Fatalf("after rapid reset: %d", code)
	}
}

// Malformed frame sequences end the connection with GOAWAY and the right
// code, never a panic; the proxy keeps serving.
func TestH2FramesMalformed(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", nil)
	tp := framesProxy(t, config.L7{}, be.addr, l4.Outbound)
	cases := []struct {
		name string
		send func(r *rawH2)
		want http2.ErrCode
	}{
		{"even stream id", func(r *rawH2) { r.headers(t, 2, true) }, http2.ErrCodeProtocol},
		{"window update on idle stream", func(r *rawH2) { r.fr.WriteWindowUpdate(9, 100) }, http2.ErrCodeProtocol},
		{"data on idle stream", func(r *rawH2) { r.fr.WriteData(7, true, []byte("x")) }, http2.ErrCodeProtocol},
		{"rst on idle stream", func(r *rawH2) { r.fr.WriteRSTStream(5, http2.ErrCodeCancel) }, http2.ErrCodeProtocol},
		{"bad hpack", func(r *rawH2) {
			r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0xff, 0xff, 0xff, 0xff}, EndHeaders: true})
		}, http2.ErrCodeCompression},
		{"continuation without headers", func(r *rawH2) { r.fr.WriteContinuation(1, true, []byte{0x82}) }, http2.ErrCodeProtocol},
		{"window too large", func(r *rawH2) {
			r.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 31})
		}, http2.ErrCodeFlowControl},
		{"connection window overflow", func(r *rawH2) {
			r.fr.WriteWindowUpdate(0, 1<<31-1)
			r.fr.WriteWindowUpdate(0, 1<<31-1)
		}, http2.ErrCodeFlowControl},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := dialRawH2(t, tp.addr)
			tc.send(r)
			if code, ok := r.goAway(t); !ok || code != tc.want {
				t.Fatalf("GOAWAY %v (seen %v); want %v", code, ok, tc.want)
			}
		})
	}
	t.Run("header list too large", func(t *testing.T) {
		// 20 copies of a 3.9 KB field (one literal, then HPACK table
		// references) decode to ~79 KB, over the 64 KiB limit, from one
		// small HEADERS frame: the request is answered 431.
		r := dialRawH2(t, tp.addr)
		r.hb.Reset()
		for _, kv := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "app"}, {":path", "/"}} {
			r.enc.WriteField(hpack.HeaderField{Name: kv[0], Value: kv[1]})
		}
		for range 20 {
			r.enc.WriteField(hpack.HeaderField{Name: "x-rep", Value: strings.Repeat("v", 3900)})
		}
		if err := r.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: r.hb.Bytes(), EndStream: true, EndHeaders: true}); err != nil {
			t.Fatal(err)
		}
		timeout := time.After(10 * time.Second)
		for {
			select {
			case f := <-r.frames:
				switch f := f.(type) {
				case nil:
					t.Fatal("connection closed without an answer")
				case *http2.GoAwayFrame:
					t.Fatalf("GOAWAY %v; want a 431 response", f.ErrCode)
				case *rawStatus:
					if f.status != "431" {
						t.Fatalf("status %s; want 431", f.status)
					}
					return
				}
			case <-timeout:
				t.Fatal("no answer to an oversized header list")
			}
		}
	})
	t.Run("data over the stream window", func(t *testing.T) {
		// The upstream does not read: its window fills, then ours (the
		// client ignores our window).
		slow := startBackend(t, "slow", func(w http.ResponseWriter, r *http.Request) { time.Sleep(3 * time.Second) })
		tp := framesProxy(t, config.L7{}, slow.addr, l4.Outbound)
		r := dialRawH2(t, tp.addr)
		r.headers(t, 1, false)
		chunk := make([]byte, 16384)
		go func() {
			for i := 0; i < 4*h2StreamWin/len(chunk); i++ {
				if r.fr.WriteData(1, false, chunk) != nil {
					return
				}
			}
		}()
		timeout := time.After(10 * time.Second)
		for {
			select {
			case f := <-r.frames:
				if rst, ok := f.(*http2.RSTStreamFrame); ok && rst.StreamID == 1 {
					if rst.ErrCode != http2.ErrCodeFlowControl {
						t.Fatalf("RST_STREAM %v; want FLOW_CONTROL_ERROR", rst.ErrCode)
					}
					return
				}
				if f == nil {
					t.Fatal("connection closed without RST_STREAM")
				}
			case <-timeout:
				t.Fatal("no RST_STREAM for a stream over its window")
			}
		}
	})
	if code, _, _ := get(t, h2cClient(), tp.addr, "app", "/"); code != 200 {
		t.Fatalf("after malformed input: %d", code)
	}
}

// FuzzH2Frames feeds arbitrary bytes after a valid preface and SETTINGS to
// the frame forwarder: it must never panic or hang, and keep serving.
func FuzzH2Frames(f *testing.F) {
	var b bytes.Buffer
	fr := http2.NewFramer(&b, nil)
	enc := hpack.NewEncoder(&bytes.Buffer{})
	_ = enc
	var hb bytes.Buffer
	he := hpack.NewEncoder(&hb)
	for _, kv := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "app"}, {":path", "/"}} {
		he.WriteField(hpack.HeaderField{Name: kv[0], Value: kv[1]})
	}
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndStream: true, EndHeaders: true})
	f.Add(append([]byte(nil), b.Bytes()...))
	b.Reset()
	fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: hb.Bytes(), EndHeaders: true})
	fr.WriteData(3, false, []byte("body"))
	fr.WriteRSTStream(3, http2.ErrCodeCancel)
	fr.WritePing(false, [8]byte{1})
	fr.WriteWindowUpdate(0, 1000)
	f.Add(append([]byte(nil), b.Bytes()...))
	f.Add([]byte{0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 0, 0, 1})

	be := startBackend(f, "app", nil)
	// Not framesProxy: with -fuzz the inputs run in worker processes, so
	// this process's proxy may serve nothing.
	tp := startProxy(f, config.L7{HTTP2Forwarder: config.H2Frames}, be.addr, l4.Outbound)
	// A normal request on a new connection, which the forwarder must serve
	// after every input; its client's connection is closed afterwards.
	normal := func(t testing.TB) {
		t.Helper()
		c := h2cClient()
		defer c.CloseIdleConnections()
		if code, h, _ := get(t, c, tp.addr, "app", "/"); code != 200 || h.Get("X-Proto") != "HTTP/2.0" {
			t.Fatalf("normal request after the input: %d over %q, want 200 over HTTP/2.0", code, h.Get("X-Proto"))
		}
	}
	// The baseline: the goroutines of a proxy that served one normal
	// request (its pooled upstream connection included).
	normal(f)
	served := tp.h2.served.Load()
	baseline := 0 // measured by the first input, in the goroutine inputs run in
	f.Fuzz(func(t *testing.T, data []byte) {
		if baseline == 0 {
			baseline = runtime.NumGoroutine()
			for settled := 0; settled < 3; { // goroutines of earlier tests may still be ending
				time.Sleep(50 * time.Millisecond)
				if n := runtime.NumGoroutine(); n != baseline {
					baseline, settled = n, 0
				} else {
					settled++
				}
			}
		}
		c, err := net.Dial("tcp", tp.addr)
		if err != nil {
			t.Fatal(err)
		}
		h2Handshake(t, c)
		c.Write(data)
		c.SetReadDeadline(time.Now().Add(200 * time.Millisecond))
		io.Copy(io.Discard, c)
		c.Close()
		normal(t)
		if n := tp.h2.served.Load(); n < served+2 {
			t.Fatalf("the frame forwarder served %d of the input's and the normal request's connections, want both", n-served)
		}
		served = tp.h2.served.Load()
		// Every goroutine the input's connection started ends.
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > baseline {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				t.Fatalf("%d goroutines 5s after the input's connection closed, baseline %d:\n%s",
					runtime.NumGoroutine(), baseline, buf[:runtime.Stack(buf, true)])
			}
			time.Sleep(10 * time.Millisecond)
		}
	})
}

// Upstream pools of original destinations leave the map when their last
// connection is gone, so many passthrough destinations do not pile up.
func TestH2FramesPoolsDropped(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "a", nil)
	tp := framesProxy(t, config.L7{}, be.addr, l4.Outbound)
	c := h2cClient()
	if code, _, _ := get(t, c, tp.addr, "a", "/"); code != 200 {
		t.Fatalf("first backend: %d", code)
	}
	pools := func() (n int) {
		tp.h2.pools.Range(func(_, _ any) bool { n++; return true })
		return n
	}
	if pools() != 1 {
		t.Fatalf("%d pools after one request; want 1", pools())
	}
	be.srv.Close() // the upstream connection ends
	waitUntil(t, func() bool { return pools() == 0 })
	be2 := startBackend(t, "b", nil)
	tp.setDst(be2.addr)
	// A new client connection: the original destination is per connection.
	if code, _, b := get(t, h2cClient(), tp.addr, "b", "/"); code != 200 || !strings.HasPrefix(b, "b ") {
		t.Fatalf("second backend: %d %q", code, b)
	}
}

// A client that floods PINGs and never reads the answers is disconnected
// once too many answers wait for it (16 MiB; 64 KiB here), so memory stays
// bounded.
func TestH2FramesPingFloodNotReading(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", nil)
	tp := framesProxy(t, config.L7{}, be.addr, l4.Outbound)
	tp.h2.outMax.Store(64 << 10)
	c, err := net.Dial("tcp", tp.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fr := h2Handshake(t, c)
	c.SetWriteDeadline(time.Now().Add(60 * time.Second))
	for i := 0; ; i++ {
		if err := fr.WritePing(false, [8]byte{byte(i)}); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("still connected after %d unread PINGs", i)
			}
			return // the proxy hung up
		}
	}
}
