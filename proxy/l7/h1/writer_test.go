package h1

import (
	"bufio"
	"bytes"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"
)

// respond runs handler against a ResponseWriter writing to a buffer and
// reads what it wrote back with net/http's client-side parser.
func respond(t *testing.T, w *ResponseWriter, method string, reqClose bool, handler func(http.ResponseWriter)) (raw string, resps []*http.Response, bodies []string, finishErr error) {
	t.Helper()
	var out bytes.Buffer
	r := &http.Request{Method: method, Close: reqClose, Header: http.Header{}}
	w.Reset(r, &out)
	handler(w)
	finishErr = w.Finish()
	raw = out.String()
	br := bufio.NewReader(strings.NewReader(raw))
	for br.Buffered() > 0 || len(resps) == 0 {
		resp, err := http.ReadResponse(br, r)
		if err != nil {
			t.Fatalf("net/http cannot read what the writer wrote: %v\n%q", err, raw)
		}
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatalf("body: %v\n%q", err, raw)
		}
		resps, bodies = append(resps, resp), append(bodies, string(b))
		if resp.StatusCode >= 200 {
			break
		}
	}
	return raw, resps, bodies, finishErr
}

func TestResponseWriterFraming(t *testing.T) {
	big := strings.Repeat("x", 10<<10)
	for _, tc := range []struct {
		name     string
		method   string
		handler  func(http.ResponseWriter)
		status   int
		body     string
		clen     int64 // -1: unknown (chunked)
		chunked  bool
		trailer  map[string]string
		closeHdr bool
	}{
		{name: "small body gets a Content-Length", handler: func(w http.ResponseWriter) { _, _ = io.WriteString(w, "hello") },
			status: 200, body: "hello", clen: 5},
		{name: "empty 200", handler: func(w http.ResponseWriter) {}, status: 200, clen: 0},
		{name: "body outgrowing the pending buffer goes chunked", handler: func(w http.ResponseWriter) {
			for i := 0; i < 10; i++ {
				_, _ = io.WriteString(w, big[:1<<10])
			}
		}, status: 200, body: big, clen: -1, chunked: true},
		{name: "declared Content-Length is kept", handler: func(w http.ResponseWriter) {
			w.Header().Set("Content-Length", "10240")
			_, _ = io.WriteString(w, big[:4<<10])
			_, _ = io.WriteString(w, big[4<<10:])
		}, status: 200, body: big, clen: 10 << 10},
		{name: "invalid Content-Length is replaced at the end", handler: func(w http.ResponseWriter) {
			w.Header().Set("Content-Length", "nope")
			_, _ = io.WriteString(w, "abc")
		}, status: 200, body: "abc", clen: 3},
		{name: "declared trailer", handler: func(w http.ResponseWriter) {
			w.Header().Set("Trailer", "Grpc-Status, Grpc-Message")
			w.WriteHeader(200)
			_, _ = io.WriteString(w, "data")
			w.Header().Set("Grpc-Status", "0")
			w.Header().Set("Grpc-Message", "ok")
		}, status: 200, body: "data", clen: -1, chunked: true, trailer: map[string]string{"Grpc-Status": "0", "Grpc-Message": "ok"}},
		{name: "TrailerPrefix trailer", handler: func(w http.ResponseWriter) {
			_, _ = io.WriteString(w, "data")
			w.Header().Set(http.TrailerPrefix+"x-late", "1")
		}, status: 200, body: "data", clen: -1, chunked: true, trailer: map[string]string{"X-Late": "1"}},
		{name: "HEAD keeps the declared length and sends no body", method: http.MethodHead, handler: func(w http.ResponseWriter) {
			w.Header().Set("Content-Length", "42")
			if n, err := io.WriteString(w, "ignored"); n != 7 || err != nil {
				panic("HEAD body write should be swallowed")
			}
		}, status: 200, clen: 42},
		{name: "204 has no Content-Length", handler: func(w http.ResponseWriter) {
			w.Header().Set("Content-Length", "5")
			w.WriteHeader(http.StatusNoContent)
			if _, err := io.WriteString(w, "nope"); !errors.Is(err, http.ErrBodyNotAllowed) {
				panic("204 body write: " + errString(err))
			}
		}, status: 204, clen: 0},
		{name: "handler's Connection: close", handler: func(w http.ResponseWriter) {
			w.Header().Set("Connection", "close")
			_, _ = io.WriteString(w, "bye")
		}, status: 200, body: "bye", clen: 3, closeHdr: true},
		{name: "status without a text", handler: func(w http.ResponseWriter) { w.WriteHeader(599) }, status: 599, clen: 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			method := tc.method
			if method == "" {
				method = http.MethodGet
			}
			var w ResponseWriter
			raw, resps, bodies, err := respond(t, &w, method, false, tc.handler)
			if err != nil {
				t.Fatalf("Finish: %v", err)
			}
			resp := resps[len(resps)-1]
			if resp.StatusCode != tc.status || bodies[len(bodies)-1] != tc.body {
				t.Fatalf("got %d %q, want %d %q\n%q", resp.StatusCode, bodies[len(bodies)-1], tc.status, tc.body, raw)
			}
			if tc.status != 204 && method != http.MethodHead && resp.ContentLength != tc.clen {
				t.Errorf("ContentLength %d, want %d\n%q", resp.ContentLength, tc.clen, raw)
			}
			if method == http.MethodHead && resp.Header.Get("Content-Length") != "42" {
				t.Errorf("HEAD Content-Length %q\n%q", resp.Header.Get("Content-Length"), raw)
			}
			if tc.status == 204 && resp.Header.Get("Content-Length") != "" {
				t.Errorf("204 with Content-Length\n%q", raw)
			}
			if got := len(resp.TransferEncoding) == 1 && resp.TransferEncoding[0] == "chunked"; got != tc.chunked {
				t.Errorf("chunked %v, want %v\n%q", got, tc.chunked, raw)
			}
			for k, v := range tc.trailer {
				if resp.Trailer.Get(k) != v {
					t.Errorf("trailer %s = %q, want %q\n%q", k, resp.Trailer.Get(k), v, raw)
				}
			}
			if resp.Header.Get("Date") == "" {
				t.Errorf("no Date\n%q", raw)
			}
			if resp.Close != tc.closeHdr || w.CloseAfter() != tc.closeHdr {
				t.Errorf("close: header %v, CloseAfter %v, want %v\n%q", resp.Close, w.CloseAfter(), tc.closeHdr, raw)
			}
		})
	}
}

func TestResponseWriterInformational(t *testing.T) {
	var w ResponseWriter
	raw, resps, bodies, err := respond(t, &w, http.MethodGet, false, func(w http.ResponseWriter) {
		w.Header().Set("Link", "</a.css>; rel=preload")
		w.WriteHeader(http.StatusEarlyHints)
		w.Header().Del("Link")
		_, _ = io.WriteString(w, "ok")
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(resps) != 2 || resps[0].StatusCode != 103 || resps[0].Header.Get("Link") == "" ||
		resps[1].StatusCode != 200 || bodies[1] != "ok" || resps[1].Header.Get("Link") != "" {
		t.Fatalf("want 103 with Link then 200 ok without:\n%q", raw)
	}
}

func TestResponseWriterCloseAndReuse(t *testing.T) {
	var w ResponseWriter
	draining := false
	w.MustClose = func() bool { return draining }

	// The request asked to close.
	_, resps, _, _ := respond(t, &w, http.MethodGet, true, func(w http.ResponseWriter) {
		w.Header().Set("X-First", "1")
	})
	if !resps[0].Close || !w.CloseAfter() {
		t.Fatalf("request Connection: close not honoured: %v %v", resps[0].Close, w.CloseAfter())
	}
	// The next response on the same writer: keep-alive, no header of the first.
	_, resps, _, _ = respond(t, &w, http.MethodGet, false, func(w http.ResponseWriter) {})
	if resps[0].Close || w.CloseAfter() || resps[0].Header.Get("X-First") != "" {
		t.Fatalf("state leaked from the previous response: close %v/%v, X-First %q", resps[0].Close, w.CloseAfter(), resps[0].Header.Get("X-First"))
	}
	// The server drains: MustClose closes.
	draining = true
	_, resps, _, _ = respond(t, &w, http.MethodGet, false, func(w http.ResponseWriter) {})
	if !resps[0].Close || !w.CloseAfter() {
		t.Fatalf("MustClose not honoured: %v %v", resps[0].Close, w.CloseAfter())
	}
}

func TestResponseWriterErrors(t *testing.T) {
	var w ResponseWriter
	// Longer than declared, still pending when the handler returns: Finish
	// fails and nothing of the body is sent.
	var out bytes.Buffer
	w.Reset(&http.Request{Method: http.MethodGet}, &out)
	w.Header().Set("Content-Length", "3")
	_, _ = io.WriteString(&w, "abcd")
	if err := w.Finish(); !errors.Is(err, ErrContentLength) || strings.Contains(out.String(), "abc") {
		t.Fatalf("pending body past Content-Length: Finish %v, wrote %q", err, out.String())
	}
	// Longer than declared once the head is out: the Write fails.
	out.Reset()
	w.Reset(&http.Request{Method: http.MethodGet}, &out)
	w.Header().Set("Content-Length", "3")
	_ = w.FlushError()
	if _, err := io.WriteString(&w, "abcd"); !errors.Is(err, ErrContentLength) {
		t.Fatalf("write past Content-Length: %v", err)
	}
	if err := w.Finish(); err == nil || strings.Contains(out.String(), "abc") {
		t.Fatalf("Finish %v, wrote %q", err, out.String())
	}

	// Shorter than declared: Finish reports the connection unusable.
	out.Reset()
	w.Reset(&http.Request{Method: http.MethodGet}, &out)
	w.Header().Set("Content-Length", "10")
	_ = w.FlushError()
	_, _ = io.WriteString(&w, "abc")
	if err := w.Finish(); err == nil || !strings.Contains(err.Error(), "3 bytes, Content-Length 10") {
		t.Fatalf("short body: Finish %v", err)
	}

	// A header value with CR/LF cannot inject a header.
	raw, resps, _, err := respond(t, &w, http.MethodGet, false, func(rw http.ResponseWriter) {
		rw.Header()["X-V"] = []string{"a\r\nX-Injected: 1"}
		rw.Header()["Bad Name"] = []string{"x"}
	})
	if err != nil || resps[0].Header.Get("X-Injected") != "" || resps[0].Header.Get("X-V") != "a  X-Injected: 1" || strings.Contains(raw, "Bad Name") {
		t.Fatalf("header sanitising: err %v\n%q", err, raw)
	}
}

func TestResponseWriterFlush(t *testing.T) {
	var w ResponseWriter
	var out bytes.Buffer
	w.Reset(&http.Request{Method: http.MethodGet}, &out)
	_, _ = io.WriteString(&w, "part")
	if out.Len() != 0 {
		t.Fatalf("wrote before a flush: %q", out.String())
	}
	if err := w.FlushError(); err != nil {
		t.Fatal(err)
	}
	if s := out.String(); !strings.HasPrefix(s, "HTTP/1.1 200 OK\r\n") || !strings.Contains(s, "Transfer-Encoding: chunked\r\n") || !strings.HasSuffix(s, "4\r\npart\r\n") {
		t.Fatalf("after Flush: %q", s)
	}
	_, _ = io.WriteString(&w, "more")
	if err := w.Finish(); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(&out), nil)
	if err != nil {
		t.Fatal(err)
	}
	if b, _ := io.ReadAll(resp.Body); string(b) != "partmore" {
		t.Fatalf("body %q", b)
	}
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}
