package l7

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strings"
	"testing"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
)

func TestPassthroughHTTP1AndH2C(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", nil)
	for _, dir := range []l4.Direction{l4.Outbound, l4.Inbound} {
		tp := startProxy(t, config.L7{AccessLog: config.AccessLog{Enabled: true}}, be.addr, dir)
		for name, c := range map[string]*http.Client{"h1": h1Client(), "h2c": h2cClient()} {
			for i := 0; i < 3; i++ { // keep-alive / multiplexed reuse
				code, h, body := get(t, c, tp.addr, "anything.example:80", "/p")
				if code != 200 || body != "app GET anything.example:80 /p" {
					t.Fatalf("%s %s: %d %q", dir, name, code, body)
				}
				want := "HTTP/1.1"
				if name == "h2c" {
					want = "HTTP/2.0"
				}
				if h.Get("X-Proto") != want {
					t.Errorf("%s %s: upstream proto %s, want %s (downstream protocol kept)", dir, name, h.Get("X-Proto"), want)
				}
			}
		}
		if l := tp.log.String(); !strings.Contains(l, `"direction":"`+dir.String()+`"`) || !strings.Contains(l, `"status":200`) {
			t.Errorf("access log missing entries:\n%s", l)
		}
	}
}

func TestChunkedAndKeepAliveRaw(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		w.Header().Set("Trailer", "X-Sum")
		fmt.Fprintf(w, "got %d bytes te=%v", len(b), r.TransferEncoding)
		w.(http.Flusher).Flush()
		w.Header().Set("X-Sum", fmt.Sprint(len(b)))
	})
	tp := startProxy(t, config.L7{}, be.addr, l4.Outbound)
	c, err := net.Dial("tcp", tp.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	for i := 0; i < 2; i++ {
		fmt.Fprintf(c, "POST /up HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if string(b) != "got 11 bytes te=[chunked]" || resp.Trailer.Get("X-Sum") != "11" {
			t.Fatalf("request %d: %q trailer=%v", i, b, resp.Trailer)
		}
		if resp.Close {
			t.Fatalf("request %d: connection not kept alive", i)
		}
	}
}

func TestProtocolDetectionFallsBackToTCP(t *testing.T) {
	t.Parallel()
	// An echo server speaking a non-HTTP protocol.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() { io.Copy(c, c); c.Close() }()
		}
	}()
	tp := startProxy(t, mustLoad(t, "detection: {timeout: 100ms}\n"), ln.Addr().String(), l4.Outbound)
	for _, msg := range []string{"\x00\x01binary-protocol\n", ""} {
		c, err := net.Dial("tcp", tp.addr)
		if err != nil {
			t.Fatal(err)
		}
		if msg == "" {
			// Server-first style: the client waits; detection times out, then data flows.
			buf := make([]byte, 0)
			_ = buf
			msg = "late hello\n"
			// Nothing written until after the detection timeout.
			defer c.Close()
			if _, err := c.Write(nil); err != nil {
				t.Fatal(err)
			}
			// sleep longer than detection timeout
			waitFor(150)
		}
		fmt.Fprint(c, msg)
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
			t.Fatalf("echo through TCP fallback: %q %v", got, err)
		}
		c.Close()
	}
}

func TestAccessLogSampling(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", nil)
	for _, tc := range []struct {
		rate string
		p    float64
	}{{"1", 1}, {"0.25", 0.25}, {"0", 0}} {
		tp := startProxy(t, mustLoad(t, "accessLog: {enabled: true, sampleRate: "+tc.rate+"}"), be.addr, l4.Outbound)
		c := h1Client()
		const n = 400
		for i := 0; i < n; i++ {
			get(t, c, tp.addr, "svc", "/s")
		}
		lines := strings.Count(tp.log.String(), "\n")
		if tc.p == 1 && lines != n || tc.p == 0 && lines != 0 || !binomialOK(lines, n, tc.p) {
			t.Errorf("sampleRate %s: %d of %d requests logged", tc.rate, lines, n)
		}
		if tc.p == 1 {
			for _, l := range strings.Split(strings.TrimSpace(tp.log.String()), "\n") {
				if !json.Valid([]byte(l)) {
					t.Fatalf("access log line is not JSON: %s", l)
				}
			}
			first := strings.SplitN(tp.log.String(), "\n", 2)[0]
			for _, k := range []string{`"method":"GET"`, `"authority":"svc"`, `"path":"/s"`, `"status":200`, `"cluster":"passthrough"`, `"upstream":"` + be.addr + `"`} {
				if !strings.Contains(first, k) {
					t.Errorf("access log line lacks %s: %s", k, first)
				}
			}
		}
	}
}

// TestForwardingHeadersPassThrough: what an ingress put in Forwarded and
// X-Forwarded-* reaches the app unchanged, over HTTP/1.1 and h2c (frame
// forwarder and net/http), with and without route header operations.
func TestForwardingHeadersPassThrough(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%q %q %q %q", r.Header["X-Forwarded-For"], r.Header["Forwarded"], r.Header["X-Forwarded-Proto"], r.Header["X-Forwarded-Host"])
	})
	want := `["203.0.113.7, 10.0.0.1"] ["for=203.0.113.7;proto=https"] ["https"] ["shop.example"]`
	hdrs := []string{"X-Forwarded-For", "203.0.113.7, 10.0.0.1", "Forwarded", "for=203.0.113.7;proto=https",
		"X-Forwarded-Proto", "https", "X-Forwarded-Host", "shop.example"}
	routed := mustLoad(t, oneClusterConfig("    headers: {request: {set: {x-route: r}}}", "  protocol: auto", be.addr))
	for _, engine := range []string{config.H2Frames, config.H2NetHTTP} {
		for name, cfg := range map[string]config.L7{"inbound": {}, "routed": routed} {
			cfg.HTTP2Forwarder = engine
			dir, host := l4.Inbound, "app"
			if name == "routed" {
				dir, host = l4.Outbound, "s"
			}
			tp := startProxy(t, cfg, be.addr, dir)
			if name == "routed" {
				tp.setDst("127.0.0.1:80")
			}
			for proto, c := range map[string]*http.Client{"h1": h1Client(), "h2c": h2cClient()} {
				if code, _, body := get(t, c, tp.addr, host, "/", hdrs...); code != 200 || body != want {
					t.Errorf("%s %s %s: %d %s; want %s", engine, name, proto, code, body, want)
				}
			}
		}
	}
}

// TestQueryPassesUnchanged: the query reaches the app byte for byte, a
// semicolon included, over HTTP/1.1 and h2c on both HTTP/2 engines.
func TestQueryPassesUnchanged(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.URL.RawQuery) })
	const q = "a=1;b=2&c=%3B&d"
	for _, engine := range []string{config.H2Frames, config.H2NetHTTP} {
		tp := startProxy(t, config.L7{HTTP2Forwarder: engine}, be.addr, l4.Inbound)
		for proto, c := range map[string]*http.Client{"h1": h1Client(), "h2c": h2cClient()} {
			if code, _, body := get(t, c, tp.addr, "app", "/p?"+q); code != 200 || body != q {
				t.Errorf("%s %s: %d %q; want %q", engine, proto, code, body, q)
			}
		}
	}
}

// TestRequestID: a request without x-request-id gets a fresh UUIDv4 that
// the app and the access log see; one that has it keeps it. Over
// HTTP/1.1 and h2c on both HTTP/2 engines.
func TestRequestID(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", func(w http.ResponseWriter, r *http.Request) { io.WriteString(w, r.Header.Get("X-Request-Id")) })
	uuid4 := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	for _, engine := range []string{config.H2Frames, config.H2NetHTTP} {
		tp := startProxy(t, config.L7{HTTP2Forwarder: engine, AccessLog: config.AccessLog{Enabled: true}}, be.addr, l4.Inbound)
		for proto, c := range map[string]*http.Client{"h1": h1Client(), "h2c": h2cClient()} {
			_, _, id1 := get(t, c, tp.addr, "app", "/")
			_, _, id2 := get(t, c, tp.addr, "app", "/")
			if !uuid4.MatchString(id1) || !uuid4.MatchString(id2) || id1 == id2 {
				t.Errorf("%s %s: generated ids %q, %q; want two different UUIDv4", engine, proto, id1, id2)
			}
			if !strings.Contains(tp.log.String(), `"request_id":"`+id1+`"`) {
				t.Errorf("%s %s: access log lacks request_id %s:\n%s", engine, proto, id1, tp.log.String())
			}
			if _, _, got := get(t, c, tp.addr, "app", "/", "X-Request-Id", "client-chosen-1"); got != "client-chosen-1" {
				t.Errorf("%s %s: client's x-request-id arrived as %q", engine, proto, got)
			}
		}
	}
}
