package h1

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
)

// ReadBufSize is the size of the codec's connection read buffer, and so
// the largest request head it parses itself; larger heads go to net/http,
// which enforces its own limit.
const ReadBufSize = 8 << 10

var (
	readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, ReadBufSize) }}
	writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4<<10) }}
)

// GetReader returns a pooled reader of ReadBufSize reading from r;
// PutReader returns it to the pool.
func GetReader(r io.Reader) *bufio.Reader {
	br := readers.Get().(*bufio.Reader)
	br.Reset(r)
	return br
}

// PutReader returns a reader GetReader gave (it no longer reads its source).
func PutReader(br *bufio.Reader) {
	br.Reset(nil)
	readers.Put(br)
}

// Body is a request body held in memory (the codec reads bodies of known
// length up to MaxBody before the request is served).
type Body struct{ bytes.Reader }

// Close does nothing: the bytes belong to the codec's buffer.
func (*Body) Close() error { return nil }

// ResponseWriter is the codec's http.ResponseWriter for one connection,
// reused from one request to the next. The head is written when the body
// outgrows the pending buffer, on Flush, or at Finish; a response whose
// length is unknown by then is sent chunked.
//
// Between Finish and the next Reset it holds no write buffer (idle
// connections cost no buffer). Not safe for concurrent use, as
// net/http's ResponseWriter is not.
type ResponseWriter struct {
	// MustClose, when set, is asked as the head is written whether the
	// connection must end after this response (its server drains); the
	// head then carries Connection: close. Set it once, before the first
	// Reset.
	MustClose func() bool

	dst         io.Writer
	bw          *bufio.Writer
	hdr         http.Header
	req         *http.Request
	status      int
	wroteHeader bool
	committed   bool
	chunked     bool
	noBody      bool
	closeAfter  bool
	clen        int64 // declared Content-Length, -1 when unknown
	written     int64
	pending     []byte
	trailers    []string // declared trailer names
	err         error
}

// ErrContentLength is the error of a Write past the declared Content-Length.
var ErrContentLength = errors.New("h1: response body longer than its Content-Length")

// Reset prepares w for the response to r, written to dst.
func (w *ResponseWriter) Reset(r *http.Request, dst io.Writer) {
	hdr := w.hdr
	if hdr == nil {
		hdr = make(http.Header, 16)
	} else {
		clear(hdr)
	}
	bw := w.bw
	*w = ResponseWriter{MustClose: w.MustClose, dst: dst, bw: bw, hdr: hdr, req: r, clen: -1,
		pending: w.pending[:0], trailers: w.trailers[:0], closeAfter: r.Close}
	if w.bw == nil {
		w.bw = writers.Get().(*bufio.Writer)
		w.bw.Reset(dst)
	}
}

// CloseAfter reports whether the connection must close after this response
// (the request or the handler asked for it, or MustClose said so).
func (w *ResponseWriter) CloseAfter() bool { return w.closeAfter }

// Header is http.ResponseWriter's.
func (w *ResponseWriter) Header() http.Header { return w.hdr }

// WriteHeader is http.ResponseWriter's; an informational status (103) is
// sent at once with the headers set so far.
func (w *ResponseWriter) WriteHeader(code int) {
	if w.wroteHeader || w.err != nil {
		return
	}
	if code < 100 || code > 999 {
		panic(fmt.Sprintf("invalid WriteHeader code %v", code))
	}
	if code < 200 && code != http.StatusSwitchingProtocols {
		w.writeHead(code, false)
		w.err = w.bw.Flush()
		return
	}
	w.status, w.wroteHeader = code, true
	if w.req.Method == http.MethodHead || code == http.StatusNoContent || code == http.StatusNotModified {
		w.noBody = true
	}
}

// Write is http.ResponseWriter's.
func (w *ResponseWriter) Write(b []byte) (int, error) {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if w.err != nil {
		return 0, w.err
	}
	if w.noBody {
		if w.req.Method == http.MethodHead {
			return len(b), nil
		}
		return 0, http.ErrBodyNotAllowed
	}
	if !w.committed {
		if len(w.pending)+len(b) <= cap(w.pending) || cap(w.pending) == 0 && len(b) <= 2<<10 {
			if cap(w.pending) == 0 {
				w.pending = make([]byte, 0, 2<<10)
			}
			w.pending = append(w.pending, b...)
			return len(b), nil
		}
		w.commit(false)
		if w.err != nil {
			return 0, w.err
		}
	}
	return w.writeBody(b)
}

func (w *ResponseWriter) writeBody(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	if w.clen >= 0 && w.written+int64(len(b)) > w.clen {
		w.err = ErrContentLength
		return 0, w.err
	}
	bw := w.bw
	if w.chunked {
		_, _ = bw.WriteString(strconv.FormatInt(int64(len(b)), 16))
		_, _ = bw.WriteString("\r\n")
	}
	n, err := bw.Write(b)
	if w.chunked && err == nil {
		_, err = bw.WriteString("\r\n")
	}
	w.written += int64(n)
	if err != nil {
		w.err = err
	}
	return n, err
}

// Flush sends the head and what the body has so far.
func (w *ResponseWriter) Flush() { _ = w.FlushError() }

// FlushError is Flush reporting the write error (http.ResponseController).
func (w *ResponseWriter) FlushError() error {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !w.committed {
		w.commit(false)
	}
	if w.err != nil {
		return w.err
	}
	w.err = w.bw.Flush()
	return w.err
}

// commit writes the head. final says the handler has returned, so a body
// still pending has a known length.
func (w *ResponseWriter) commit(final bool) {
	w.committed = true
	h := w.hdr
	for _, v := range h["Trailer"] {
		for _, name := range strings.Split(v, ",") {
			if name = strings.TrimSpace(name); name != "" {
				w.trailers = append(w.trailers, http.CanonicalHeaderKey(name))
			}
		}
	}
	if w.MustClose != nil && w.MustClose() || httpguts.HeaderValuesContainsToken(h["Connection"], "close") {
		w.closeAfter = true
	}
	delete(h, "Connection")
	switch {
	case w.noBody:
		if w.status == http.StatusNoContent {
			delete(h, "Content-Length")
		}
		delete(h, "Transfer-Encoding")
	case len(w.trailers) > 0 || hasTrailerPrefix(h):
		w.chunked = true
		delete(h, "Content-Length")
	case h.Get("Content-Length") != "":
		v, err := strconv.ParseInt(h.Get("Content-Length"), 10, 64)
		if err != nil || v < 0 {
			delete(h, "Content-Length")
			if final {
				h["Content-Length"] = []string{strconv.Itoa(len(w.pending))}
				w.clen = int64(len(w.pending))
			} else {
				w.chunked = true
			}
		} else {
			w.clen = v
		}
	case final:
		w.clen = int64(len(w.pending))
		h["Content-Length"] = []string{strconv.Itoa(len(w.pending))}
	default:
		w.chunked = true
	}
	if w.chunked {
		h["Transfer-Encoding"] = chunkedValue
	} else {
		delete(h, "Transfer-Encoding")
	}
	if _, ok := h["Date"]; !ok {
		h["Date"] = []string{httpDate()}
	}
	w.writeHead(w.status, w.closeAfter)
	if len(w.pending) > 0 {
		p := w.pending
		w.pending = w.pending[:0]
		_, _ = w.writeBody(p)
	}
}

var chunkedValue = []string{"chunked"}

func (w *ResponseWriter) writeHead(code int, closeConn bool) {
	bw := w.bw
	_, _ = bw.WriteString(statusLine(code))
	for k, vs := range w.hdr {
		if strings.HasPrefix(k, http.TrailerPrefix) || !httpguts.ValidHeaderFieldName(k) {
			continue
		}
		for _, v := range vs {
			writeField(bw, k, v)
		}
	}
	if closeConn {
		_, _ = bw.WriteString("Connection: close\r\n")
	}
	_, err := bw.WriteString("\r\n")
	if err != nil {
		w.err = err
	}
}

func writeField(bw *bufio.Writer, k, v string) {
	_, _ = bw.WriteString(k)
	_, _ = bw.WriteString(": ")
	if strings.ContainsAny(v, "\r\n") {
		v = strings.NewReplacer("\r", " ", "\n", " ").Replace(v)
	}
	_, _ = bw.WriteString(v)
	_, _ = bw.WriteString("\r\n")
}

// Finish completes the response after the handler returned, flushes it
// and gives the write buffer back. An error means the connection cannot
// carry another request.
func (w *ResponseWriter) Finish() error {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !w.committed {
		w.commit(true)
	}
	bw := w.bw
	if w.err == nil && w.chunked {
		_, _ = bw.WriteString("0\r\n")
		for _, k := range w.trailers {
			for _, v := range w.hdr[k] {
				writeField(bw, k, v)
			}
		}
		for k, vs := range w.hdr {
			if name, ok := strings.CutPrefix(k, http.TrailerPrefix); ok {
				for _, v := range vs {
					writeField(bw, http.CanonicalHeaderKey(name), v)
				}
			}
		}
		_, w.err = bw.WriteString("\r\n")
	}
	if w.err == nil && !w.noBody && w.clen >= 0 && w.written != w.clen {
		w.err = fmt.Errorf("h1: response body %d bytes, Content-Length %d", w.written, w.clen)
	}
	if err := bw.Flush(); w.err == nil {
		w.err = err
	}
	// Idle connections hold no write buffer.
	bw.Reset(nil)
	writers.Put(bw)
	w.bw = nil
	return w.err
}

func hasTrailerPrefix(h http.Header) bool {
	for k := range h {
		if strings.HasPrefix(k, http.TrailerPrefix) {
			return true
		}
	}
	return false
}

// statusLines holds "HTTP/1.1 200 OK\r\n" for every code net/http names.
var statusLines = func() (t [600]string) {
	for code := 100; code < len(t); code++ {
		if text := http.StatusText(code); text != "" {
			t[code] = "HTTP/1.1 " + strconv.Itoa(code) + " " + text + "\r\n"
		}
	}
	return t
}()

func statusLine(code int) string {
	if code < len(statusLines) && statusLines[code] != "" {
		return statusLines[code]
	}
	return "HTTP/1.1 " + strconv.Itoa(code) + " status code " + strconv.Itoa(code) + "\r\n"
}

// dateCache holds the Date header value, formatted once per second.
var dateCache atomic.Pointer[struct {
	sec int64
	s   string
}]

func httpDate() string {
	now := time.Now()
	if d := dateCache.Load(); d != nil && d.sec == now.Unix() {
		return d.s
	}
	d := &struct {
		sec int64
		s   string
	}{now.Unix(), now.UTC().Format(http.TimeFormat)}
	dateCache.Store(d)
	return d.s
}
