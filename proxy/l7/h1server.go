package l7

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"github.com/meshlet/meshlet/proxy/l7/h1"
	"io"
	"net"
	"net/http"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"

	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/sniff"
)

// The downstream HTTP/1.1 codec.
//
// Every downstream HTTP connection starts here. Requests in the common
// shape — HTTP/1.1, origin-form target, Host present, no body or a body of
// known length up to h1.MaxBody, no Upgrade, no Expect, no
// Transfer-Encoding, the whole header within h1ReadBufSize — are parsed in
// place and answered by a response writer that frames the response itself.
// The first request of any other shape (and the HTTP/2 preface) hands the
// connection, with every byte read so far, to net/http's server, which
// serves it from then on: net/http keeps the edge cases (and their error
// answers: 400, 431, 505, …) and this codec only ever accepts requests it
// parses exactly. Nothing is consumed before the decision, so a handoff is
// invisible to the client.
//
// Why not net/http's server for everything: per request it starts a
// background read to notice a client going away (a goroutine wake-up and
// two syscalls more per request), allocates a context, a response and its
// chunk writer, and hands bytes through two buffered writers; on a two-core
// node this was most of an L7 hop's cost (docs/benchmarks.md). Here a
// request costs one read and one write on the downstream socket, and a
// client going away is noticed by a read started only when a request has
// waited longer than h1WatchAfter.

// h1ReadBufSize bounds the request head the codec parses itself; larger
// heads go to net/http, which enforces limits.maxHeaderBytes.
const h1ReadBufSize = 8 << 10

// h1WatchAfter is how long a request may wait for its response before the
// connection is watched for the client closing it.
const h1WatchAfter = 100 * time.Millisecond

var (
	h1Readers = sync.Pool{New: func() any { return bufio.NewReaderSize(nil, h1ReadBufSize) }}
	h1Writers = sync.Pool{New: func() any { return bufio.NewWriterSize(nil, 4<<10) }}
)

// h1Conn states: idle connections wait for the first byte of a request,
// busy ones are reading or answering one.
const (
	h1Busy = iota
	h1Idle
)

// h1ServerConn is one downstream connection served by the codec.
type h1ServerConn struct {
	p   *Engine
	d   *dirServer
	tc  *trackedConn
	br  *bufio.Reader
	bw  *bufio.Writer
	ctx context.Context // the connection's context (carries connKey)

	cancel context.CancelFunc
	tmpl   *http.Request // zero request carrying ctx; copied per request
	remote string

	// Reused per request (see serveOne).
	parser h1.Parser
	body   bodyReader
	bufp   *[]byte // pooled request body buffer while a request holds one
	w      h1Writer

	mu       sync.Mutex // guards state, woken, stay, armed, watching and read deadline changes
	state    int
	woken    bool      // drainWake interrupted the idle wait
	stay     bool      // the connection cannot move to the next generation
	rdl      time.Time // the read deadline last set
	armed    bool      // a request is being served; the watch may start
	watching bool
	watchWG  sync.WaitGroup
	watchErr error
	timer    *time.Timer
}

// serveH1 serves c with the codec until it closes, or returns the
// connection net/http must go on serving (its unread bytes replayed).
func (p *Engine) serveH1(ctx context.Context, tc *trackedConn, d *dirServer) net.Conn {
	ctx, cancel := context.WithCancel(context.WithValue(ctx, connKey{}, tc))
	c := &h1ServerConn{p: p, d: d, tc: tc, ctx: ctx, cancel: cancel}
	c.tmpl = (&http.Request{TLS: tc.tls}).WithContext(ctx)
	if ra := tc.RemoteAddr(); ra != nil {
		c.remote = ra.String()
	}
	c.br = h1Readers.Get().(*bufio.Reader)
	c.br.Reset(tc)
	c.timer = time.AfterFunc(time.Hour, c.watch)
	c.timer.Stop()
	c.w.c = c
	c.w.hdr = make(http.Header, 16)

	d.addH1(c)
	stopCtx := context.AfterFunc(ctx, func() { _ = tc.Conn.Close() })
	defer func() {
		stopCtx()
		cancel()
		d.removeH1(c)
		c.timer.Stop()
		c.releaseBody()
		c.br.Reset(nil)
		h1Readers.Put(c.br)
	}()
	for {
		if handoff, done := c.serveOne(); handoff != nil || done {
			return handoff
		}
	}
}

// serveOne reads and answers one request. It returns the connection to hand
// to net/http, or done when the connection is finished.
func (c *h1ServerConn) serveOne() (handoff net.Conn, done bool) {
	lim := c.p.lim
	// Idle: wait for the first byte of the next request. A direction that
	// drains for a hot restart moves the connection to the next generation
	// here, between two requests; otherwise it stays open (see idle) and its
	// next request is answered with Connection: close.
	c.idle(orDur(lim.IdleTimeout.D, 5*time.Minute))
	if c.br.Buffered() == 0 {
		if snd := c.target(); snd != nil && c.move(snd) {
			return nil, true
		}
		if _, err := c.br.Peek(1); err != nil {
			c.mu.Lock()
			woken := c.woken
			c.woken = false
			c.mu.Unlock()
			if woken && c.br.Buffered() == 0 {
				return nil, false // the drain interrupted the wait: move
			}
			c.tc.Close()
			return nil, true
		}
	}
	c.mu.Lock()
	c.state = h1Busy
	c.woken = false // every read from here on sets its own deadline
	c.mu.Unlock()
	// The head: parse what arrived; read more (bounded by the header
	// timeout) while it is incomplete.
	maxHead := min(orInt(lim.MaxHeaderBytes, 64<<10), h1ReadBufSize)
	var head []byte
	deadlineSet := false
	for {
		buf, _ := c.br.Peek(c.br.Buffered())
		if i := h1.HeadEnd(buf); i >= 0 {
			head = buf[:i+4]
			break
		}
		if len(buf) >= maxHead {
			return c.handoff("large_head"), false
		}
		if len(buf) > 0 && !h1.Plausible(buf) {
			return c.handoff("other"), false
		}
		if !deadlineSet {
			c.setReadDeadline(time.Now().Add(orDur(lim.ReadHeaderTimeout.D, 10*time.Second)))
			deadlineSet = true
		}
		if _, err := c.br.Peek(len(buf) + 1); err != nil {
			if len(buf) > 0 {
				// Let net/http answer what it can of a truncated head
				// (it replies 400 to a malformed one, and closes).
				return c.handoff("other"), false
			}
			c.tc.Close()
			return nil, true
		}
	}
	if len(head) > maxHead {
		return c.handoff("large_head"), false
	}
	r, clen, why := c.parser.Parse(head, c.tmpl, c.remote)
	if why != "" {
		return c.handoff(why), false
	}
	if _, err := c.br.Discard(len(head)); err != nil {
		c.tc.Close()
		return nil, true
	}
	if clen > 0 {
		if !deadlineSet {
			c.setReadDeadline(time.Now().Add(orDur(lim.ReadHeaderTimeout.D, 10*time.Second)))
		}
		c.bufp = h1.GetBuf()
		if int64(cap(*c.bufp)) < clen {
			*c.bufp = make([]byte, 0, clen)
		}
		b := (*c.bufp)[:clen]
		if _, err := io.ReadFull(c.br, b); err != nil {
			c.tc.Close()
			return nil, true
		}
		c.body.Reset(b)
		r.Body = &c.body
	} else {
		r.Body = http.NoBody
	}
	// The read deadline left from reading the request does not matter while
	// it is served: only the watch reads, and it sets its own.

	w := &c.w
	w.reset(r)
	c.watchStart()
	ok := c.serve(w, r)
	c.watchStop()
	c.releaseBody()
	if ok {
		ok = w.finish() == nil
	}
	if !ok || w.closeAfter || c.watchErr != nil {
		c.tc.Close()
		return nil, true
	}
	return nil, false
}

// serve runs the handler; false means the response was aborted and the
// connection must be closed (as net/http does for http.ErrAbortHandler).
func (c *h1ServerConn) serve(w *h1Writer, r *http.Request) (ok bool) {
	defer func() {
		if v := recover(); v != nil {
			ok = false
			if v != http.ErrAbortHandler { //nolint:errorlint // recover() returns the panic value itself, which net/http compares the same way
				buf := make([]byte, 64<<10)
				buf = buf[:runtime.Stack(buf, false)]
				c.p.log.Error("l7: panic serving request", "remote", c.remote, "panic", v, "stack", string(buf))
			}
		}
	}()
	c.p.ServeHTTP(w, r)
	return true
}

// handoff gives the connection to net/http with the bytes read so far.
func (c *h1ServerConn) handoff(why string) net.Conn {
	c.p.m.handoffs.WithLabelValues(why).Inc()
	_ = c.tc.SetReadDeadline(time.Time{})
	buf, _ := c.br.Peek(c.br.Buffered())
	return sniff.NewConn(c.tc.Conn, bytes.Clone(buf))
}

func (c *h1ServerConn) releaseBody() {
	if c.bufp != nil {
		c.body.Reset(nil)
		h1.PutBuf(c.bufp)
		c.bufp = nil
	}
}

// idle marks the connection idle and arms the idle timeout.
//
// A draining direction keeps its idle connections open. Closing one is a
// race the codec cannot win: the client may be sending its next request at
// that moment, and would see a reset without knowing whether the request
// was processed. Instead the next request is served and its response
// carries Connection: close (commit), the one boundary both sides agree
// on. A connection that stays idle is closed at the drain deadline (the
// connection's ctx ends).
//
// The read deadline is set under mu so the watch's is never overwritten. It
// is re-armed only when it would otherwise fire more than a second early:
// one deadline change per second, not per request.
func (c *h1ServerConn) idle(timeout time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.state = h1Idle
	if c.br.Buffered() > 0 {
		return
	}
	if now := time.Now(); c.rdl.Before(now.Add(timeout - time.Second)) {
		c.setReadDeadline(now.Add(timeout))
	}
}

func (c *h1ServerConn) setReadDeadline(t time.Time) {
	c.rdl = t
	_ = c.tc.SetReadDeadline(t)
}

// h1Mover moves a codec connection to the next generation between two
// requests when its direction drains for a hot restart.
type h1Mover struct {
	lc *l4.Conn    // the connection as the generation server accepted it
	m  *l4.Metrics // its direction's hand-over counters; nil without a Forwarder
}

// target returns the successor to move the connection to, or nil: the
// direction is not draining, there is no successor (a shutdown drain, or
// one the server counted as refused), or the connection stays (a move
// failed or cannot be made; counted once).
func (c *h1ServerConn) target() *l4.Sender {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.targetLocked()
}

func (c *h1ServerConn) targetLocked() *l4.Sender {
	mv := c.tc.mv
	if c.stay || mv == nil || mv.lc.HandOver == nil || !c.d.draining.Load() {
		return nil
	}
	snd := mv.lc.HandOver()
	if snd == nil {
		return nil
	}
	why := ""
	if !snd.HTTP1() {
		why = "successor_l4_only"
	} else if c.socket() == nil {
		why = "not_movable"
	}
	if why != "" {
		c.stay = true
		c.p.m.notMoved.WithLabelValues(why).Inc()
		return nil
	}
	return snd
}

// socket returns the accepted socket when it is what the codec reads (under
// replayed detection bytes), nil otherwise (TLS: its state cannot move).
func (c *h1ServerConn) socket() *net.TCPConn {
	conn := c.tc.Conn
	for {
		sc, ok := conn.(*sniff.Conn)
		if !ok {
			break
		}
		conn = sc.Raw()
	}
	if tcp, ok := conn.(*net.TCPConn); ok && tcp == c.tc.mv.lc.Client {
		return tcp
	}
	return nil
}

// move sends the idle connection to snd with the bytes of its next request
// read so far; true when it moved (this generation's descriptor is then
// closed). When the send fails nothing has moved: the connection stays,
// and its next response carries Connection: close.
func (c *h1ServerConn) move(snd *l4.Sender) bool {
	mv := c.tc.mv
	buffered, _ := c.br.Peek(c.br.Buffered())
	carry := bytes.Clone(buffered)
	var replay []byte
	for conn := c.tc.Conn; ; {
		sc, ok := conn.(*sniff.Conn)
		if !ok {
			break
		}
		replay = append(replay, sc.Buffered()...)
		conn = sc.Raw()
	}
	carry = append(carry, replay...)
	err := snd.Send(&l4.Session{Direction: mv.lc.Direction, OrigDst: mv.lc.OrigDst, Accepted: mv.lc.Accepted,
		Client: mv.lc.Client, HTTP1: true, ToUpstream: carry})
	if err == nil {
		if mv.m != nil {
			mv.m.HandedOver.Inc()
		}
		return true
	}
	if len(replay) > 0 {
		c.tc.Conn = sniff.NewConn(mv.lc.Client, replay)
	}
	c.mu.Lock()
	c.stay = true
	c.mu.Unlock()
	if mv.m != nil {
		mv.m.HandoverFailures.Inc()
	}
	c.p.m.notMoved.WithLabelValues("send_failed").Inc()
	c.p.log.Warn("l7: hand-over failed; the connection ends with its next response", "remote", c.remote, "err", err)
	return false
}

// drainWake interrupts an idle connection's wait for its next request when
// it can move to the next generation; a busy one moves after its response.
func (c *h1ServerConn) drainWake() {
	c.mu.Lock()
	if c.state == h1Idle && c.targetLocked() != nil {
		c.woken = true
		c.setReadDeadline(aLongTimeAgo)
	}
	c.mu.Unlock()
}

// watchStart arms the client-gone watch for the request being served.
func (c *h1ServerConn) watchStart() {
	c.watchErr = nil
	c.mu.Lock()
	c.armed = true
	c.mu.Unlock()
	c.timer.Reset(h1WatchAfter)
}

// watch runs on the timer's goroutine when a request has waited
// h1WatchAfter: it reads from the connection until the request is done.
// An error other than the deadline set by watchStop means the client closed
// or reset the connection: the request is cancelled. Bytes of a pipelined
// next request stay in the reader.
func (c *h1ServerConn) watch() {
	c.mu.Lock()
	if !c.armed || c.watching {
		c.mu.Unlock()
		return
	}
	c.watching = true
	c.watchWG.Add(1)
	c.setReadDeadline(time.Time{})
	c.mu.Unlock()
	defer c.watchWG.Done()
	if _, err := c.br.Peek(1); err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return
		}
		c.watchErr = err
		c.cancel()
	}
}

// watchStop ends the watch: after it returns no other goroutine reads the
// connection.
func (c *h1ServerConn) watchStop() {
	c.timer.Stop()
	c.mu.Lock()
	c.armed = false
	watching := c.watching
	c.watching = false
	if watching {
		c.setReadDeadline(aLongTimeAgo)
	}
	c.mu.Unlock()
	if watching {
		c.watchWG.Wait()
	}
}

// bodyReader is a request body held in memory.
type bodyReader struct{ bytes.Reader }

func (*bodyReader) Close() error { return nil }

// h1Writer is the codec's http.ResponseWriter. The head is written when the
// body outgrows the pending buffer, on Flush, or when the handler returns;
// a response whose length is unknown by then is sent chunked.
type h1Writer struct {
	c           *h1ServerConn
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

var errH1ContentLength = errors.New("l7: response body longer than its Content-Length")

func (w *h1Writer) reset(r *http.Request) {
	clear(w.hdr)
	*w = h1Writer{c: w.c, hdr: w.hdr, req: r, clen: -1, pending: w.pending[:0], trailers: w.trailers[:0], closeAfter: r.Close}
	if w.c.bw == nil {
		w.c.bw = h1Writers.Get().(*bufio.Writer)
		w.c.bw.Reset(w.c.tc)
	}
}

func (w *h1Writer) Header() http.Header { return w.hdr }

func (w *h1Writer) WriteHeader(code int) {
	if w.wroteHeader || w.err != nil {
		return
	}
	if code < 100 || code > 999 {
		panic(fmt.Sprintf("invalid WriteHeader code %v", code))
	}
	if code < 200 && code != http.StatusSwitchingProtocols {
		// Informational (103 Early Hints): the head now, with the headers
		// set so far.
		w.writeHead(code, false)
		w.err = w.c.bw.Flush()
		return
	}
	w.status, w.wroteHeader = code, true
	if w.req.Method == http.MethodHead || code == http.StatusNoContent || code == http.StatusNotModified {
		w.noBody = true
	}
}

func (w *h1Writer) Write(b []byte) (int, error) {
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

func (w *h1Writer) writeBody(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	if w.clen >= 0 && w.written+int64(len(b)) > w.clen {
		w.err = errH1ContentLength
		return 0, w.err
	}
	bw := w.c.bw
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
func (w *h1Writer) Flush() { _ = w.FlushError() }

// FlushError is Flush reporting the write error (http.ResponseController).
func (w *h1Writer) FlushError() error {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !w.committed {
		w.commit(false)
	}
	if w.err != nil {
		return w.err
	}
	w.err = w.c.bw.Flush()
	return w.err
}

// commit writes the head. final says the handler has returned, so a body
// still pending has a known length.
func (w *h1Writer) commit(final bool) {
	w.committed = true
	h := w.hdr
	for _, v := range h["Trailer"] {
		for _, name := range strings.Split(v, ",") {
			if name = strings.TrimSpace(name); name != "" {
				w.trailers = append(w.trailers, http.CanonicalHeaderKey(name))
			}
		}
	}
	if w.c.d.draining.Load() && w.c.target() == nil || httpguts.HeaderValuesContainsToken(h["Connection"], "close") {
		// A connection that moves to the next generation after this
		// response stays keep-alive.
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

func (w *h1Writer) writeHead(code int, closeConn bool) {
	bw := w.c.bw
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

// finish completes the response after the handler returned and flushes it.
// An error means the connection cannot carry another request.
func (w *h1Writer) finish() error {
	if !w.wroteHeader {
		w.WriteHeader(http.StatusOK)
	}
	if !w.committed {
		w.commit(true)
	}
	bw := w.c.bw
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
		w.err = fmt.Errorf("l7: response body %d bytes, Content-Length %d", w.written, w.clen)
	}
	if err := bw.Flush(); w.err == nil {
		w.err = err
	}
	// Idle connections hold no write buffer.
	bw.Reset(nil)
	h1Writers.Put(bw)
	w.c.bw = nil
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

// httpDate is the Date header value, formatted once per second.
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

// addH1 and removeH1 track the codec's connections of a direction, for
// the drain (idle ones are woken to move) and Close.
func (d *dirServer) addH1(c *h1ServerConn) {
	d.h1mu.Lock()
	if d.h1 == nil {
		d.h1 = map[*h1ServerConn]struct{}{}
	}
	d.h1[c] = struct{}{}
	d.h1mu.Unlock()
}

func (d *dirServer) removeH1(c *h1ServerConn) {
	d.h1mu.Lock()
	delete(d.h1, c)
	d.h1mu.Unlock()
}

// eachH1 calls f for every codec connection of the direction.
func (d *dirServer) eachH1(f func(*h1ServerConn)) {
	d.h1mu.Lock()
	defer d.h1mu.Unlock()
	for c := range d.h1 {
		f(c)
	}
}

// aLongTimeAgo is a deadline that makes blocked I/O return at once.
var aLongTimeAgo = time.Unix(1, 0)
