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
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
)

// codecBackend answers by path: /echo echoes method, path, query, Host and
// body; /big sends 100 KiB; /stream sends three flushed chunks and a
// trailer; /nocontent is a 204; /slow waits 300ms.
func codecBackend(t *testing.T) *backend {
	return startBackend(t, "app", func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/big":
			w.Write(bytes.Repeat([]byte("x"), 100<<10))
		case "/stream":
			w.Header().Set("Trailer", "X-Sum")
			for i := range 3 {
				fmt.Fprintf(w, "part%d;", i)
				w.(http.Flusher).Flush()
			}
			w.Header().Set("X-Sum", "3")
		case "/nocontent":
			w.WriteHeader(http.StatusNoContent)
		case "/slow":
			time.Sleep(300 * time.Millisecond)
			io.WriteString(w, "slow")
		default:
			b, _ := io.ReadAll(r.Body)
			fmt.Fprintf(w, "%s %s ?%s host=%s x=%q body=%q", r.Method, r.URL.Path, r.URL.RawQuery, r.Host, r.Header["X-Multi"], b)
		}
	})
}

// rawResponses sends req on a new connection and reads n responses (fewer
// when the connection closes); closed reports whether the proxy closed the
// connection after them.
func rawResponses(t *testing.T, addr, req string, n int, head bool) (out []string, closed bool) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	for range n {
		var r *http.Request
		if head {
			r = &http.Request{Method: http.MethodHead}
		}
		resp, err := http.ReadResponse(br, r)
		if err != nil {
			return out, true
		}
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			out = append(out, "body error: "+err.Error())
			return out, true
		}
		out = append(out, describe(resp, b))
	}
	c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	_, err = br.ReadByte()
	var ne net.Error
	return out, !(errorsAs(err, &ne) && ne.Timeout())
}

func errorsAs(err error, target *net.Error) bool {
	return errors.As(err, target)
}

// describe is what must be the same whichever server answered: status,
// body, framing and headers (but Date).
func describe(resp *http.Response, body []byte) string {
	var keys []string
	for k := range resp.Header {
		if k != "Date" {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	var b strings.Builder
	fmt.Fprintf(&b, "%s len=%d te=%v close=%v body=%q", resp.Status, resp.ContentLength, resp.TransferEncoding, resp.Close, body)
	for _, k := range keys {
		fmt.Fprintf(&b, " %s=%q", k, resp.Header[k])
	}
	for k, v := range resp.Trailer {
		fmt.Fprintf(&b, " trailer:%s=%q", k, v)
	}
	return b.String()
}

// TestH1CodecMatchesNetHTTP sends the same bytes to a proxy serving with
// the codec and to one serving with net/http only, and wants the same
// answers: for requests the codec takes, and for those it hands over.
func TestH1CodecMatchesNetHTTP(t *testing.T) {
	t.Parallel()
	be := codecBackend(t)
	cfg := mustLoad(t, `
services: [{name: s, hosts: [s], routes: [{name: r, match: [{uri: {regex: "/(echo|big|stream|nocontent).*"}}], destinations: [{cluster: c}]}]}]
clusters: [{name: c, endpoints: [{address: "`+be.addr+`"}]}]
ports: [{port: 80, name: http-web}]
limits: {maxHeaderBytes: 4096}
`)
	codec := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	plain := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound, func(o *Options) { o.netHTTPOnly = true })

	big := strings.Repeat("b", 5000)
	tests := []struct {
		name, req string
		n         int
		head      bool
		handoff   string // the reason the codec hands over ("" = it serves it)
	}{
		{"get", "GET /echo?a=1 HTTP/1.1\r\nHost: s\r\nX-Multi: 1\r\nx-multi: 2\r\n\r\n", 1, false, ""},
		{"pipelined keep-alive", "GET /echo HTTP/1.1\r\nHost: s\r\n\r\nPOST /echo HTTP/1.1\r\nHost: s\r\nContent-Length: 5\r\n\r\nhello" +
			"GET /big HTTP/1.1\r\nHost: s\r\n\r\n", 3, false, ""},
		{"close", "GET /echo HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\nGET /echo HTTP/1.1\r\nHost: s\r\n\r\n", 2, false, ""},
		{"head", "HEAD /big HTTP/1.1\r\nHost: s\r\n\r\n", 1, true, ""},
		{"no content", "GET /nocontent HTTP/1.1\r\nHost: s\r\n\r\n", 1, false, ""},
		{"streamed with trailer", "GET /stream HTTP/1.1\r\nHost: s\r\nTE: trailers\r\n\r\n", 1, false, ""},
		{"escaped path", "GET /echo/a%2Fb%20c?q=%41 HTTP/1.1\r\nHost: s\r\n\r\n", 1, false, ""},
		{"no route", "GET /other HTTP/1.1\r\nHost: s:80\r\n\r\n", 1, false, ""},
		{"empty body length", "POST /echo HTTP/1.1\r\nHost: s\r\nContent-Length: 0\r\n\r\n", 1, false, ""},
		{"chunked request", "POST /echo HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 1, false, "transfer_encoding"},
		{"expect continue", "POST /echo HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nhi", 1, false, "expect"},
		{"http/1.0", "GET /echo HTTP/1.0\r\nHost: s\r\n\r\n", 1, false, "http1.0"},
		{"large head", "GET /echo HTTP/1.1\r\nHost: s\r\nX-Big: " + big + "\r\n\r\n", 1, false, "large_head"},
		{"missing host", "GET /echo HTTP/1.1\r\n\r\n", 1, false, "other"},
		{"two hosts", "GET /echo HTTP/1.1\r\nHost: s\r\nHost: t\r\n\r\n", 1, false, "other"},
		{"two lengths", "POST /echo HTTP/1.1\r\nHost: s\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", 1, false, "other"},
		{"bad length", "POST /echo HTTP/1.1\r\nHost: s\r\nContent-Length: -1\r\n\r\n", 1, false, "other"},
		{"space before colon", "GET /echo HTTP/1.1\r\nHost: s\r\nX-A : 1\r\n\r\n", 1, false, "other"},
		{"obs-fold", "GET /echo HTTP/1.1\r\nHost: s\r\nX-A: 1\r\n 2\r\n\r\n", 1, false, "other"},
		{"absolute form", "GET http://s/echo HTTP/1.1\r\nHost: s\r\n\r\n", 1, false, "other"},
		{"control byte in value", "GET /echo HTTP/1.1\r\nHost: s\r\nX-A: a\x01b\r\n\r\n", 1, false, "other"},
		{"bad version", "GET /echo HTTP/9.9\r\nHost: s\r\n\r\n", 1, false, "other"},
		{"garbage", "GARBAGE\x00GARBAGE\r\n\r\n", 1, false, "other"},
		{"second request hands over", "GET /echo HTTP/1.1\r\nHost: s\r\n\r\nPOST /echo HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n", 2, false, "transfer_encoding"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var before float64
			if tt.handoff != "" {
				before = float64(codec.m.handoffs.WithLabelValues(tt.handoff).Value())
			}
			want, wantClosed := rawResponses(t, plain.addr, tt.req, tt.n, tt.head)
			got, gotClosed := rawResponses(t, codec.addr, tt.req, tt.n, tt.head)
			if len(want) == 0 {
				t.Fatalf("net/http answered nothing")
			}
			if !slices.Equal(got, want) || gotClosed != wantClosed {
				t.Errorf("codec:\n  %s\n  closed=%v\nnet/http:\n  %s\n  closed=%v", strings.Join(got, "\n  "), gotClosed, strings.Join(want, "\n  "), wantClosed)
			}
			if tt.handoff != "" {
				if d := float64(codec.m.handoffs.WithLabelValues(tt.handoff).Value()) - before; d != 1 {
					t.Errorf("handoffs{reason=%q} grew by %v; want 1", tt.handoff, d)
				}
			}
		})
	}
	// Requests the codec serves are never handed over.
	var total float64
	for _, why := range []string{"http2", "http1.0", "upgrade", "expect", "transfer_encoding", "large_body", "large_head", "other"} {
		total += float64(codec.m.handoffs.WithLabelValues(why).Value())
	}
	if want := 15.0; total != want {
		t.Errorf("%v handoffs in all; want %v (one per handed-over case)", total, want)
	}
}

// TestH1CodecClientGoneCancelsUpstream: a client that closes its connection
// while its request waits for the upstream cancels the upstream request,
// as net/http's background read does; a pipelined request arriving during a
// slow one is not mistaken for that and is answered after it.
func TestH1CodecClientGoneCancelsUpstream(t *testing.T) {
	t.Parallel()
	cancelled := make(chan struct{}, 1)
	started := make(chan struct{}, 1)
	be := startBackend(t, "app", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/fast" {
			io.WriteString(w, "fast")
			return
		}
		started <- struct{}{}
		select {
		case <-r.Context().Done():
			cancelled <- struct{}{}
		case <-time.After(400 * time.Millisecond):
			io.WriteString(w, "slow")
		}
	})
	tp := startProxy(t, config.L7{}, be.addr, l4.Outbound)

	c, err := net.Dial("tcp", tp.addr)
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(c, "GET /hang HTTP/1.1\r\nHost: app\r\n\r\n")
	<-started
	time.Sleep(2 * h1WatchAfter)
	c.Close()
	select {
	case <-cancelled:
	case <-time.After(5 * time.Second):
		t.Fatal("upstream request not cancelled after the client closed")
	}

	c, err = net.Dial("tcp", tp.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
	<-started
	time.Sleep(2 * h1WatchAfter) // the watch is reading now
	io.WriteString(c, "GET /fast HTTP/1.1\r\nHost: app\r\n\r\n")
	br := bufio.NewReader(c)
	for _, want := range []string{"slow", "fast"} {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("reading %s response: %v", want, err)
		}
		b, _ := io.ReadAll(resp.Body)
		if string(b) != want {
			t.Fatalf("got %q; want %q", b, want)
		}
	}
	select {
	case <-cancelled:
		t.Fatal("the slow request was cancelled by its pipelined successor")
	default:
	}
}

// TestH1CodecDrainKeepsIdle: a drain does not close a keep-alive connection
// idle in the codec (the client may be sending its next request at that
// moment, and would see a reset): the next request is answered with
// Connection: close, and then the connection closes. A request already on
// its way when the drain starts is answered with Connection: close too. A
// connection that stays idle is closed when the drain's deadline ends.
func TestH1CodecDrainKeepsIdle(t *testing.T) {
	t.Parallel()
	be := codecBackend(t)
	tp := startProxy(t, config.L7{}, be.addr, l4.Inbound)
	keepAlive := func() (net.Conn, *bufio.Reader) {
		c, err := net.Dial("tcp", tp.addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		c.SetDeadline(time.Now().Add(5 * time.Second))
		io.WriteString(c, "GET /echo HTTP/1.1\r\nHost: app\r\n\r\n")
		br := bufio.NewReader(c)
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.Close {
			t.Fatalf("first response: %v close=%v", err, resp != nil && resp.Close)
		}
		io.Copy(io.Discard, resp.Body)
		return c, br
	}
	idle, idleBR := keepAlive()
	_, silentBR := keepAlive()

	busy, err := net.Dial("tcp", tp.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	busy.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(busy, "GET /slow HTTP/1.1\r\nHost: app\r\n\r\n")
	time.Sleep(100 * time.Millisecond)

	tp.StartDrain(l4.Inbound)
	resp, err := http.ReadResponse(bufio.NewReader(busy), nil)
	if err != nil {
		t.Fatalf("in-flight request lost: %v", err)
	}
	b, _ := io.ReadAll(resp.Body)
	if string(b) != "slow" || !resp.Close {
		t.Fatalf("in-flight: %q close=%v; want slow with Connection: close", b, resp.Close)
	}

	// The idle connection's next request, sent after the drain began.
	if _, err := io.WriteString(idle, "POST /echo HTTP/1.1\r\nHost: app\r\nContent-Length: 5\r\n\r\nafter"); err != nil {
		t.Fatalf("writing on the idle connection after the drain began: %v", err)
	}
	resp, err = http.ReadResponse(idleBR, nil)
	if err != nil {
		t.Fatalf("idle connection's request after the drain began: %v; want an answer", err)
	}
	b, _ = io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !strings.Contains(string(b), `body="after"`) || !resp.Close {
		t.Fatalf("after the drain began: %d %q close=%v; want 200, the body, Connection: close", resp.StatusCode, b, resp.Close)
	}
	if _, err := idleBR.ReadByte(); err != io.EOF {
		t.Fatalf("after the Connection: close response: %v; want EOF", err)
	}

	// The silent connection holds the drain until its deadline.
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	defer cancel()
	if err := tp.Drain(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Drain with an idle connection left: %v; want the deadline", err)
	}
	if _, err := silentBR.ReadByte(); err != io.EOF {
		t.Fatalf("idle connection after the drain deadline: %v; want EOF", err)
	}
}
