package l7

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/status"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
)

// TestDrainHTTP1: the in-flight request finishes with Connection: close and
// Drain waits for it.
func TestDrainHTTP1(t *testing.T) {
	t.Parallel()
	started := make(chan struct{}, 1)
	be := startBackend(t, "app", func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		time.Sleep(300 * time.Millisecond)
		io.WriteString(w, "slow done")
	})
	tp := startProxy(t, config.L7{}, be.addr, l4.Outbound)
	c, err := net.Dial("tcp", tp.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprint(c, "GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
	<-started
	drained := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		drained <- tp.Drain(ctx)
	}()
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("in-flight request lost: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || string(b) != "slow done" || !resp.Close {
		t.Fatalf("got %d %q close=%v; want 200 with Connection: close", resp.StatusCode, b, resp.Close)
	}
	select {
	case err := <-drained:
		if err != nil {
			t.Fatalf("Drain: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Drain did not return")
	}
}

// TestDrainHTTP2GoAwayKeepsStream speaks raw HTTP/2 frames: after Drain the
// client sees GOAWAY, and the stream that was in flight still completes.
func TestDrainHTTP2GoAwayKeepsStream(t *testing.T) {
	t.Parallel()
	started := make(chan struct{}, 1)
	be := startBackend(t, "app", func(w http.ResponseWriter, r *http.Request) {
		started <- struct{}{}
		time.Sleep(300 * time.Millisecond)
		io.WriteString(w, "h2 done")
	})
	tp := startProxy(t, config.L7{}, be.addr, l4.Outbound)
	c, err := net.Dial("tcp", tp.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fr := h2Handshake(t, c)
	h2Request(t, fr, 1, "/slow", true)
	<-started
	drained := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		drained <- tp.Drain(ctx)
	}()
	var goaway bool
	var body bytes.Buffer
	var status string
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	for done := false; !done; {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("reading frames (goaway=%v body=%q): %v", goaway, body.String(), err)
		}
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			goaway = true
		case *http2.MetaHeadersFrame:
			status = f.PseudoValue("status")
			done = f.StreamEnded()
		case *http2.DataFrame:
			body.Write(f.Data())
			done = f.StreamEnded()
		case *http2.SettingsFrame:
			if !f.IsAck() {
				fr.WriteSettingsAck()
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				fr.WritePing(true, f.Data)
			}
		}
	}
	if !goaway || status != "200" || body.String() != "h2 done" {
		t.Fatalf("goaway=%v status=%q body=%q; want GOAWAY and the in-flight stream completed", goaway, status, body.String())
	}
	if err := <-drained; err != nil {
		t.Fatalf("Drain: %v", err)
	}
}

// TestDrainGRPCStreamMidFlight: a bidi gRPC stream open across Drain keeps
// working until the client ends it, and Drain waits for it.
func TestDrainGRPCStreamMidFlight(t *testing.T) {
	t.Parallel()
	_, addr, _ := startGRPC(t, "echo")
	tp := startProxy(t, config.L7{}, addr, l4.Outbound)
	cc := grpcConn(t, tp.addr, "echo")
	bs, err := testpb.NewTestServiceClient(cc).FullDuplexCall(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	roundTrip := func(i int) { bidiRoundTrip(t, bs, fmt.Sprintf("m%d", i)) }
	roundTrip(0)
	drained := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		drained <- tp.Drain(ctx)
	}()
	for i := 1; i <= 10; i++ {
		roundTrip(i)
		time.Sleep(20 * time.Millisecond)
	}
	select {
	case err := <-drained:
		t.Fatalf("Drain returned (%v) while a stream was open", err)
	default:
	}
	bs.CloseSend()
	if _, err := bs.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("stream end: %v (%v)", err, status.Code(err) == codes.OK)
	}
	select {
	case err := <-drained:
		if err != nil {
			t.Fatalf("Drain: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Drain did not return after the stream ended")
	}
}

func h2Handshake(t testing.TB, c net.Conn) *http2.Framer {
	t.Helper()
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(c, c)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	return fr
}

func h2Request(t testing.TB, fr *http2.Framer, stream uint32, path string, end bool) {
	t.Helper()
	if err := h2RequestErr(fr, stream, path, end); err != nil {
		t.Fatal(err)
	}
}

func h2RequestErr(fr *http2.Framer, stream uint32, path string, end bool) error {
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, kv := range [][2]string{{":method", "GET"}, {":scheme", "http"}, {":authority", "app"}, {":path", path}} {
		enc.WriteField(hpack.HeaderField{Name: kv[0], Value: kv[1]})
	}
	return fr.WriteHeaders(http2.HeadersFrameParam{StreamID: stream, BlockFragment: hb.Bytes(), EndStream: end, EndHeaders: true})
}
