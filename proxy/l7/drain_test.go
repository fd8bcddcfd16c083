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
	"strings"
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

// TestDrainHTTP2StreamRacingGoAway: a stream the client opens after the
// drain's GOAWAY was sent but before the client read it is served, not
// refused or lost with the connection: the first GOAWAY names the highest
// possible stream and is followed by a PING; only the PING's answer brings
// the final GOAWAY, naming the last stream. A stream opened after that is
// refused with REFUSED_STREAM (the client may retry it), the one in flight
// finishes, and then the connection closes.
func TestDrainHTTP2StreamRacingGoAway(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/slow" {
			time.Sleep(300 * time.Millisecond)
		}
		io.WriteString(w, "done "+r.URL.Path)
	})
	tp := startProxy(t, config.L7{}, be.addr, l4.Outbound)
	c, err := net.Dial("tcp", tp.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	fr := h2Handshake(t, c)

	// next reads frames until one the test cares about.
	next := func() drainEvent {
		for {
			f, err := fr.ReadFrame()
			if err != nil {
				return drainEvent{readErr: err}
			}
			switch f := f.(type) {
			case *http2.GoAwayFrame:
				return drainEvent{goaway: f}
			case *http2.PingFrame:
				if !f.IsAck() && f.Data == goAwayPing {
					return drainEvent{ping: true}
				}
				if !f.IsAck() {
					fr.WritePing(true, f.Data)
				}
			case *http2.RSTStreamFrame:
				return drainEvent{stream: f.StreamID, rst: f.ErrCode}
			case *http2.DataFrame:
				if len(f.Data()) > 0 || f.StreamEnded() {
					return drainEvent{stream: f.StreamID, body: string(f.Data()), ended: f.StreamEnded()}
				}
			case *http2.SettingsFrame:
				if !f.IsAck() {
					fr.WriteSettingsAck()
				}
			}
		}
	}
	// body reads stream's body to its end, noting other events on the way.
	body := func(stream uint32, other *[]drainEvent) string {
		var b strings.Builder
		for {
			e := next()
			if e.readErr != nil {
				t.Fatalf("reading stream %d (body so far %q, events %s): %v", stream, b.String(), *other, e.readErr)
			}
			if e.stream != stream || e.rst != 0 {
				*other = append(*other, e)
				if e.stream == stream {
					t.Fatalf("stream %d reset: %v", stream, e.rst)
				}
				continue
			}
			b.WriteString(e.body)
			if e.ended {
				return b.String()
			}
		}
	}
	var other []drainEvent
	h2Request(t, fr, 1, "/first", true)
	if got := body(1, &other); got != "done /first" {
		t.Fatalf("stream 1: %q", got)
	}

	tp.StartDrain(l4.Outbound)
	// The client opens stream 3 before it reads the GOAWAY.
	h2Request(t, fr, 3, "/slow", true)
	e := next()
	if e.goaway == nil || e.goaway.LastStreamID != 1<<31-1 || e.goaway.ErrCode != http2.ErrCodeNo {
		t.Fatalf("first frame after the drain: %s; want GOAWAY naming stream 2^31-1, NO_ERROR", e)
	}
	if e := next(); !e.ping {
		t.Fatalf("after the first GOAWAY: %s; want its PING", e)
	}
	if err := fr.WritePing(true, goAwayPing); err != nil {
		t.Fatal(err)
	}
	if e := next(); e.goaway == nil || e.goaway.LastStreamID != 3 {
		t.Fatalf("after the PING's answer: %s; want the final GOAWAY naming stream 3", e)
	}
	// A client that ignores the GOAWAY: its new stream is refused.
	h2Request(t, fr, 5, "/late", true)
	if got := body(3, &other); got != "done /slow" {
		t.Fatalf("stream 3 (opened before the client read the GOAWAY): %q; want served", got)
	}
	if len(other) == 0 {
		other = append(other, next())
	}
	if e := other[0]; e.stream != 5 || e.rst != http2.ErrCodeRefusedStream {
		t.Fatalf("stream 5 (opened after the final GOAWAY): %s; want REFUSED_STREAM", other)
	}
	if e := next(); !errors.Is(e.readErr, io.EOF) {
		t.Fatalf("after the last stream: %s; want the connection closed", e)
	}
	if tp.h2.served.Load() == 0 {
		t.Fatal("the frame forwarder did not serve the connection")
	}
}

// drainEvent is a frame (or read error) TestDrainHTTP2StreamRacingGoAway
// looks at.
type drainEvent struct {
	goaway  *http2.GoAwayFrame
	ping    bool
	rst     http2.ErrCode
	stream  uint32
	body    string
	ended   bool
	readErr error
}

func (e drainEvent) String() string {
	switch {
	case e.readErr != nil:
		return "read error " + e.readErr.Error()
	case e.goaway != nil:
		return fmt.Sprintf("GOAWAY last stream %d %v", e.goaway.LastStreamID, e.goaway.ErrCode)
	case e.ping:
		return "PING"
	case e.rst != 0:
		return fmt.Sprintf("RST_STREAM %d %v", e.stream, e.rst)
	}
	return fmt.Sprintf("DATA %d %q end=%v", e.stream, e.body, e.ended)
}

// TestDrainServesConnectionsAlreadyAccepted: a connection that reaches the
// engine after its direction began draining was accepted before the
// listener closed, and its client is sending a request: it is answered (an
// HTTP/1.1 response with Connection: close; on HTTP/2, GOAWAY and the
// client's first stream served), never closed unanswered.
func TestDrainServesConnectionsAlreadyAccepted(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, "ok "+r.Proto) })
	tp := startProxy(t, config.L7{}, be.addr, l4.Outbound)
	tp.StartDrain(l4.Outbound)

	c, err := net.Dial("tcp", tp.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: app\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatalf("HTTP/1.1 request on a connection that arrived during the drain: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || string(b) != "ok HTTP/1.1" || !resp.Close {
		t.Fatalf("HTTP/1.1 during the drain: %d %q close=%v; want 200 with Connection: close", resp.StatusCode, b, resp.Close)
	}

	c2, err := net.Dial("tcp", tp.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	c2.SetDeadline(time.Now().Add(5 * time.Second))
	fr := h2Handshake(t, c2)
	h2Request(t, fr, 1, "/", true)
	var goaway bool
	var body strings.Builder
	for done := false; !done; {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatalf("HTTP/2 during the drain (goaway=%v, body %q): %v", goaway, body.String(), err)
		}
		switch f := f.(type) {
		case *http2.GoAwayFrame:
			goaway = true
		case *http2.PingFrame:
			if !f.IsAck() {
				fr.WritePing(true, f.Data)
			}
		case *http2.SettingsFrame:
			if !f.IsAck() {
				fr.WriteSettingsAck()
			}
		case *http2.RSTStreamFrame:
			t.Fatalf("HTTP/2 stream reset during the drain: %v", f.ErrCode)
		case *http2.DataFrame:
			body.Write(f.Data())
			done = f.StreamEnded()
		}
	}
	if !goaway || body.String() != "ok HTTP/2.0" {
		t.Fatalf("HTTP/2 during the drain: goaway=%v body %q; want GOAWAY and the stream served", goaway, body.String())
	}
}
