package upstream

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/url"
	"reflect"
	"strings"
	"testing"
)

// TestH1WireRequestMatchesNetHTTP: for every request writeRequest takes it
// writes exactly the bytes http.Request.Write writes, and it declines the
// ones it does not write the same way.
func TestH1WireRequestMatchesNetHTTP(t *testing.T) {
	mk := func(method, target, host string, h http.Header, body string) *http.Request {
		u, err := url.Parse("http://" + "10.0.0.1:8080" + target)
		if err != nil {
			t.Fatal(err)
		}
		r := &http.Request{Method: method, URL: u, Host: host, Header: h, ContentLength: int64(len(body))}
		if body != "" {
			r.Body = io.NopCloser(strings.NewReader(body))
		} else {
			r.Body = http.NoBody
		}
		return r
	}
	cases := []struct {
		name string
		req  *http.Request
		take bool
	}{
		{"post with body", mk("POST", "/echo?size=10", "fortio:8080", http.Header{"User-Agent": {""}, "Content-Type": {"application/octet-stream"}, "X-Request-Id": {"a"}}, strings.Repeat("x", 1024)), true},
		{"get", mk("GET", "/", "s", http.Header{"Accept": {"*/*"}, "User-Agent": {"fortio.org/fortio-1.63.0"}}, ""), true},
		{"post empty", mk("POST", "/", "s", http.Header{"User-Agent": {""}}, ""), true},
		{"delete empty", mk("DELETE", "/x", "s", http.Header{}, ""), true},
		{"head", mk("HEAD", "/x", "s", http.Header{"User-Agent": {""}}, ""), true},
		{"no user agent", mk("GET", "/", "s", http.Header{"B": {"1", "2"}, "A": {"3"}}, ""), true},
		{"empty user agent list", mk("GET", "/", "s", http.Header{"User-Agent": {}}, ""), true},
		{"escaped path", mk("GET", "/a%20b/c%2Fd", "s", http.Header{}, ""), true},
		{"force query", mk("GET", "/a?", "s", http.Header{}, ""), true},
		{"invalid header name", mk("GET", "/", "s", http.Header{"Bad Name": {"x"}, "Ok": {"y"}}, ""), true},
		{"excluded headers", mk("PUT", "/", "s", http.Header{"Host": {"other"}, "Content-Length": {"99"}, "Transfer-Encoding": {"chunked"}, "Trailer": {"X"}}, "abc"), true},
		{"connection header kept", mk("GET", "/", "s", http.Header{"Connection": {"keep-alive"}}, ""), true},
		{"ipv6 host", mk("GET", "/", "[::1]:80", http.Header{}, ""), true},
		{"host from url", mk("GET", "/", "", http.Header{}, ""), true},
		{"value with newline", mk("GET", "/", "s", http.Header{"X": {"a\nb"}}, ""), false},
		{"value with space around", mk("GET", "/", "s", http.Header{"X": {" a "}}, ""), false},
		{"non-ascii host", mk("GET", "/", "bücher.example", http.Header{}, ""), false},
		{"zone in host", mk("GET", "/", "[fe80::1%25eth0]:80", http.Header{}, ""), false},
	}
	closeReq := mk("GET", "/", "s", http.Header{}, "")
	closeReq.Close = true
	cases = append(cases, struct {
		name string
		req  *http.Request
		take bool
	}{"close", closeReq, true})
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var body []byte
			if tc.req.Body != http.NoBody {
				body, _ = io.ReadAll(tc.req.Body)
				tc.req.Body = io.NopCloser(bytes.NewReader(body))
			}
			var want bytes.Buffer
			wantErr := tc.req.Write(&want)
			var got bytes.Buffer
			bw := bufio.NewWriter(&got)
			var keys []string
			took := writeRequest(bw, tc.req, body, &keys)
			bw.Flush()
			if took != tc.take {
				t.Fatalf("writeRequest took it: %v, want %v", took, tc.take)
			}
			if !took {
				if got.Len() != 0 {
					t.Fatalf("declined but wrote %q", got.String())
				}
				return
			}
			if wantErr != nil {
				t.Fatalf("net/http refuses the request (%v) but writeRequest wrote %q", wantErr, got.String())
			}
			if got.String() != want.String() {
				t.Fatalf("writeRequest wrote\n%q\nnet/http writes\n%q", got.String(), want.String())
			}
		})
	}
}

// TestH1WireResponseMatchesNetHTTP: a response head the fast path takes
// gives the response http.ReadResponse gives (status, header, length,
// body); one it declines is left unread for net/http.
func TestH1WireResponseMatchesNetHTTP(t *testing.T) {
	post := &http.Request{Method: "POST"}
	cases := []struct {
		name string
		raw  string
		req  *http.Request
		take bool
	}{
		{"fortio echo", "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nDate: Thu, 03 Dec 2026 17:00:00 GMT\r\nContent-Length: 5\r\n\r\nhello", post, true},
		{"no reason", "HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", post, true},
		{"odd reason", "HTTP/1.1 503 Service Unavailable Now\r\nContent-Length: 2\r\n\r\nno", post, true},
		{"lower-case names", "HTTP/1.1 404 Not Found\r\ncontent-length: 3\r\nx-envoy-upstream: a\r\nx-envoy-upstream: b\r\n\r\nabc", post, true},
		{"white space", "HTTP/1.1 200 OK\r\nContent-Length:   3 \r\nX:\t v \t\r\nEmpty:\r\n\r\nabc", post, true},
		{"leading spaces in status", "HTTP/1.1  201 Created\r\nContent-Length: 0\r\n\r\n", post, true},
		{"chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", post, false},
		{"no length", "HTTP/1.1 200 OK\r\nX: y\r\n\r\nuntil close", post, false},
		{"connection close", "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx", post, false},
		{"pragma", "HTTP/1.1 200 OK\r\nPragma: no-cache\r\nContent-Length: 1\r\n\r\nx", post, false},
		{"http/1.0", "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", post, false},
		{"1xx first", "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx", post, false},
		{"204", "HTTP/1.1 204 No Content\r\n\r\n", post, false},
		{"head", "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", &http.Request{Method: "HEAD"}, false},
		{"two lengths", "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx", post, false},
		{"signed length", "HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx", post, false},
		{"bare LF", "HTTP/1.1 200 OK\nContent-Length: 1\n\nx", post, false},
		{"bare LF inside", "HTTP/1.1 200 OK\r\nA: b\nContent-Length: 1\r\n\r\nx", post, false},
		{"folded", "HTTP/1.1 200 OK\r\nA: b\r\n c\r\nContent-Length: 1\r\n\r\nx", post, false},
		{"bad name", "HTTP/1.1 200 OK\r\nA b: c\r\nContent-Length: 1\r\n\r\nx", post, false},
		{"control byte", "HTTP/1.1 200 OK\r\nA: b\x01\r\nContent-Length: 1\r\n\r\nx", post, false},
		{"bad code", "HTTP/1.1 2x0 OK\r\nContent-Length: 1\r\n\r\nx", post, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			checkResponse(t, tc.raw, tc.req, tc.take)
		})
	}
}

// checkResponse compares the fast path's reading of raw with net/http's.
func checkResponse(t *testing.T, raw string, req *http.Request, take bool) {
	t.Helper()
	want, wantErr := http.ReadResponse(bufio.NewReader(strings.NewReader(raw)), req)
	var wantBody []byte
	if wantErr == nil {
		wantBody, wantErr = io.ReadAll(want.Body)
	}
	br := bufio.NewReaderSize(strings.NewReader(raw), 4<<10)
	head, ok, err := responseHead(br)
	if err != nil {
		t.Fatalf("responseHead: %v", err)
	}
	var got *http.Response
	var clen int64
	if ok {
		got, clen = parseResponse(head, req)
	}
	if (got != nil) != take {
		t.Fatalf("fast path took %q: %v, want %v", raw, got != nil, take)
	}
	if got == nil {
		if br.Buffered() != len(raw) && len(raw) <= 4<<10 {
			t.Fatalf("declined but consumed: %d of %d bytes left", br.Buffered(), len(raw))
		}
		return
	}
	if wantErr != nil {
		t.Fatalf("net/http refuses %q (%v) but the fast path took it", raw, wantErr)
	}
	br.Discard(len(head))
	b := &h1Body{fast: true, left: clen, pc: &h1Conn{br: br}, done: true}
	var gotBody []byte
	buf := make([]byte, 7)
	for {
		n, err := b.readFast(buf)
		gotBody = append(gotBody, buf[:n]...)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	if got.Status != want.Status || got.StatusCode != want.StatusCode || got.Proto != want.Proto ||
		got.ProtoMajor != want.ProtoMajor || got.ProtoMinor != want.ProtoMinor || got.ContentLength != want.ContentLength ||
		got.Close != want.Close || !reflect.DeepEqual(got.Header, want.Header) || got.Request != want.Request {
		t.Fatalf("fast path read %q as\n%d %q %s %v len %d close %v\nnet/http:\n%d %q %s %v len %d close %v", raw,
			got.StatusCode, got.Status, got.Proto, got.Header, got.ContentLength, got.Close,
			want.StatusCode, want.Status, want.Proto, want.Header, want.ContentLength, want.Close)
	}
	if !bytes.Equal(gotBody, wantBody) {
		t.Fatalf("body %q, net/http %q", gotBody, wantBody)
	}
}

// TestH1WireResponseRandom: random header sets in the shapes upstreams
// send (seeded): the fast path agrees with net/http on every one it takes,
// and takes the plain ones.
func TestH1WireResponseRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(18, 1))
	names := []string{"Content-Type", "content-type", "Date", "X-A", "x-a", "Server", "Set-Cookie", "Vary", "X-Weird_Name", "Cache-Control"}
	values := []string{"", "a", " b", "c ", "text/html; charset=utf-8", "x,y", "\tz", "ü"}
	post := &http.Request{Method: "GET"}
	for i := 0; i < 2000; i++ {
		var sb strings.Builder
		code := []int{200, 201, 302, 404, 500, 503}[rng.IntN(6)]
		fmt.Fprintf(&sb, "HTTP/1.1 %d %s\r\n", code, http.StatusText(code))
		for range rng.IntN(8) {
			fmt.Fprintf(&sb, "%s: %s\r\n", names[rng.IntN(len(names))], values[rng.IntN(len(values))])
		}
		body := strings.Repeat("b", rng.IntN(3000))
		fmt.Fprintf(&sb, "Content-Length: %d\r\n\r\n%s", len(body), body)
		checkResponse(t, sb.String(), post, true)
	}
}
