package h1

import (
	"bufio"
	"bytes"
	"net/http"
	"slices"
	"testing"
)

// FuzzH1Parse: whatever the bytes, Parse does not panic, and a head it
// accepts is one net/http reads the same way (method, target, Host,
// headers, length).
func FuzzH1Parse(f *testing.F) {
	for _, s := range []string{
		"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
		"POST /x?y=1 HTTP/1.1\r\nHost: a:80\r\nContent-Length: 3\r\nX-A: b\r\nx-a: c\r\n\r\n",
		"GET /%41%2f HTTP/1.1\r\nHost: [::1]:8080\r\nConnection: keep-alive, close\r\n\r\n",
		"GET / HTTP/1.1\r\nHost: a\r\nX:\r\n\r\n",
		"PRI * HTTP/2.0\r\n\r\n",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, head []byte) {
		if !bytes.HasSuffix(head, crlfcrlf) || bytes.Count(head, crlfcrlf) != 1 {
			return
		}
		var p Parser
		r, clen, why := p.Parse(head, &http.Request{}, "")
		if why != "" {
			return
		}
		want, err := http.ReadRequest(bufio.NewReader(bytes.NewReader(head)))
		if err != nil {
			t.Fatalf("codec accepted what net/http refuses (%v): %q", err, head)
		}
		if r.Method != want.Method || r.Host != want.Host || r.URL.String() != want.URL.String() ||
			r.RequestURI != want.RequestURI || clen != want.ContentLength || r.Close != want.Close {
			t.Fatalf("codec read %q %q %q len=%d close=%v; net/http %q %q %q len=%d close=%v",
				r.Method, r.Host, r.URL, clen, r.Close, want.Method, want.Host, want.URL, want.ContentLength, want.Close)
		}
		for k, v := range want.Header {
			if !slices.Equal(r.Header[k], v) {
				t.Fatalf("header %s: codec %q, net/http %q", k, r.Header[k], v)
			}
		}
		if len(r.Header) != len(want.Header) {
			t.Fatalf("headers: codec %v, net/http %v", r.Header, want.Header)
		}
	})
}

// TestParseHandoffReasons: each head the parser does not take is handed
// over with the reason the handoffs metric counts; a plain head parses.
func TestParseHandoffReasons(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct{ head, why string }{
		{"GET /a?b=1 HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\r\n", ""},
		{"PRI * HTTP/2.0\r\n\r\n", "http2"},
		{"GET / HTTP/1.0\r\nHost: x\r\n\r\n", "http1.0"},
		{"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", "upgrade"},
		{"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n", "expect"},
		{"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n", "transfer_encoding"},
		{"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 70000\r\n\r\n", "large_body"},
		{"GET / HTTP/1.1\r\n\r\n", "other"},                        // no Host
		{"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "other"},  // two Hosts
		{"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", "other"},  // obs-fold
		{"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n", "other"}, // CONNECT
		{"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n", "other"},
	} {
		var p Parser
		r, _, why := p.Parse([]byte(tt.head), &http.Request{}, "10.0.0.1:1234")
		if why != tt.why {
			t.Errorf("%q: handoff reason %q, want %q", tt.head, why, tt.why)
			continue
		}
		if why == "" && (r.Host != "x" || r.URL.Path != "/a" || r.URL.RawQuery != "b=1" || r.Header.Get("X-A") != "1" || r.RemoteAddr != "10.0.0.1:1234") {
			t.Errorf("%q: parsed %+v", tt.head, r)
		}
	}
	if HeadEnd([]byte("GET / HTTP/1.1\r\nHost: x\r\n")) != -1 {
		t.Error("HeadEnd found the end of an incomplete head")
	}
	if Plausible([]byte("\x16\x03\x01")) || !Plausible([]byte("GET /")) {
		t.Error("Plausible: TLS looks like a request, or GET does not")
	}
}
