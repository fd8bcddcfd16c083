package upstream

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"github.com/meshlet/meshlet/proxy/l7/h1"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/textproto"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// h1Transport is a cluster's HTTP/1.1 upstream client for the common case:
// a request with a small body of known length and no upgrade. It buffers the
// body, writes the whole request and reads the response on the calling
// goroutine over a pooled keep-alive connection.
//
// net/http's Transport runs two goroutines per connection (writeLoop,
// readLoop) and hands every request and response between them and the
// caller, which costs several goroutine wake-ups per request; on a busy
// two-core node those hand-offs are most of an L7 hop's added latency and
// CPU (see docs/benchmarks.md). Requests it cannot serve (upgrades, large or
// streamed bodies) go to the net/http Transport of the same cluster, which
// keeps its own pool.
type h1Transport struct {
	dial        func(ctx context.Context, network, addr string) (net.Conn, error)
	maxIdle     int           // idle connections kept per endpoint
	idleTimeout time.Duration // an idle connection older than this is closed
	perHost     int           // connection limit per endpoint (0: none)

	mu     sync.Mutex
	hosts  map[string]*h1Host
	closed bool
}

// h1Host is the connection pool of one endpoint.
type h1Host struct {
	idle    []*h1Conn      // most recently used last
	conns   int            // open connections (idle and busy), for perHost
	waiters []chan *h1Conn // FIFO; a nil send means "a slot is free, dial"
}

// h1Conn is one upstream connection.
type h1Conn struct {
	net.Conn
	br     *bufio.Reader
	bw     *bufio.Writer
	addr   string
	idleAt time.Time
	reused bool

	// For alive: the raw connection and the peek callback, made once per
	// connection instead of once per reuse.
	raw     syscall.RawConn
	peekFn  func(fd uintptr) bool
	live    bool
	pending bool // the peek found bytes
	peekB   [1]byte

	// A TLS connection (cluster tls): the TLS layer, and the TCP connection
	// under it that can read without blocking.
	tc *tls.Conn
	nb *tlsRawConn

	// exchange's scratch, reused per request on this connection (only the
	// goroutine holding pc uses them, and they are cleared after the write).
	out   http.Request
	keys  []string // writeRequest's sorted header names
	abort func()   // sets a past deadline: the request's context ended
	bodyR bytes.Reader
	body  io.ReadCloser // io.NopCloser(&bodyR): an in-memory body to Request.write
}

var errH1TransportClosed = errors.New("l7: upstream connection pool closed")

// aLongTimeAgo is a deadline that makes blocked I/O return at once.
var aLongTimeAgo = time.Unix(1, 0)

// canServe reports whether r takes the direct path.
func (t *h1Transport) canServe(r *http.Request) bool {
	if r.Method == http.MethodConnect || r.Header.Get("Upgrade") != "" || r.Trailer != nil {
		return false
	}
	if r.Body == nil || r.Body == http.NoBody {
		return r.ContentLength <= 0
	}
	return r.ContentLength > 0 && r.ContentLength <= h1.MaxBody
}

// RoundTrip implements http.RoundTripper for requests canServe accepts.
func (t *h1Transport) RoundTrip(req *http.Request) (*http.Response, error) {
	ctx := req.Context()
	// Buffer the body: one write per request, and a stale pooled connection
	// can be replaced without losing it.
	var bufp *[]byte
	var body []byte
	if req.Body != nil && req.Body != http.NoBody {
		bufp = h1.GetBuf()
		if int64(cap(*bufp)) < req.ContentLength {
			*bufp = make([]byte, 0, req.ContentLength)
		}
		body = (*bufp)[:req.ContentLength]
		_, err := io.ReadFull(req.Body, body)
		req.Body.Close()
		if err != nil {
			h1.PutBuf(bufp)
			return nil, fmt.Errorf("reading request body: %w", err)
		}
	}
	defer func() {
		if bufp != nil {
			h1.PutBuf(bufp)
		}
	}()

	trace := httptrace.ContextClientTrace(ctx)
	addr := req.URL.Host
	for try := 0; ; try++ {
		if trace != nil && trace.GetConn != nil {
			trace.GetConn(addr)
		}
		pc, err := t.get(ctx, addr, try > 0)
		if err != nil {
			return nil, err
		}
		if trace != nil && trace.GotConn != nil {
			trace.GotConn(httptrace.GotConnInfo{Conn: pc.Conn, Reused: pc.reused})
		}
		resp, err, stale := t.exchange(ctx, pc, req, body, trace)
		if err == nil {
			return resp, nil
		}
		// A pooled connection the upstream closed between our liveness
		// check and the write: try once more on a new connection.
		if stale && try == 0 && ctx.Err() == nil {
			continue
		}
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		return nil, err
	}
}

// exchange writes req on pc and reads the response head. On error pc is
// closed; stale says the error means the pooled connection was dead before
// the upstream saw the request.
func (t *h1Transport) exchange(ctx context.Context, pc *h1Conn, req *http.Request, body []byte, trace *httptrace.ClientTrace) (resp *http.Response, err error, stale bool) { //nolint:revive // stale qualifies err, so it follows it
	if pc.abort == nil {
		pc.abort = func() { _ = pc.SetDeadline(aLongTimeAgo) } // one closure per connection, not per request
	}
	stop := context.AfterFunc(ctx, pc.abort)
	fail := func(e error, s bool) (*http.Response, error, bool) {
		stop()
		pc.Close()
		t.closed1(pc)
		return nil, e, s
	}
	if (trace == nil || trace.WroteHeaderField == nil && trace.WroteHeaders == nil && trace.WroteRequest == nil) &&
		writeRequest(pc.bw, req, body, &pc.keys) {
		clear(pc.keys) // keep no reference to the request
	} else {
		out := &pc.out
		*out = *req
		if body != nil {
			if pc.body == nil {
				pc.body = io.NopCloser(&pc.bodyR)
			}
			pc.bodyR.Reset(body)
			out.Body = pc.body
		}
		err = out.Write(pc.bw)
		*out = http.Request{} // keep no reference to the request
		pc.bodyR.Reset(nil)
		if err != nil {
			return fail(err, pc.reused)
		}
	}
	if err := pc.bw.Flush(); err != nil {
		return fail(err, pc.reused)
	}
	// The common response head is parsed here; anything else (and every
	// 1xx) by net/http, from the same unread bytes.
	head, ok, err := responseHead(pc.br)
	if err != nil {
		// responseHead fails only when not one byte came back (it reports
		// that end of stream as io.ErrUnexpectedEOF, as net/http does): on
		// a reused connection the upstream closed it as we sent, and an
		// idempotent request is safe to send again (net/http's Transport
		// does the same).
		s := pc.reused && (errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, syscall.ECONNRESET)) && idempotent(req)
		return fail(err, s)
	}
	if ok {
		if resp, clen := parseResponse(head, req); resp != nil {
			_, _ = pc.br.Discard(len(head))
			resp.Body = &h1Body{pc: pc, t: t, stop: stop, keep: !req.Close, left: clen, fast: true}
			return resp, nil, false
		}
	}
	for {
		resp, err = http.ReadResponse(pc.br, req)
		if err != nil {
			// Nothing came back on a reused connection: the upstream
			// closed it (idle timeout) as we sent; safe to resend when the
			// request is idempotent (as net/http's Transport does).
			s := pc.reused && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) && idempotent(req)
			return fail(err, s)
		}
		if resp.StatusCode >= 100 && resp.StatusCode < 200 && resp.StatusCode != http.StatusSwitchingProtocols {
			if trace != nil && trace.Got1xxResponse != nil {
				if err := trace.Got1xxResponse(resp.StatusCode, textproto.MIMEHeader(resp.Header)); err != nil {
					return fail(err, false)
				}
			}
			continue
		}
		break
	}
	keep := !resp.Close && !req.Close && resp.StatusCode != http.StatusSwitchingProtocols
	resp.Body = &h1Body{rc: resp.Body, pc: pc, t: t, stop: stop, keep: keep}
	return resp, nil, false
}

func idempotent(r *http.Request) bool {
	switch r.Method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace:
		return true
	}
	return r.Header.Get("Idempotency-Key") != "" || r.Header.Get("X-Idempotency-Key") != ""
}

// h1Body returns its connection to the pool at EOF, or closes it when the
// body is closed early.
type h1Body struct {
	rc   io.ReadCloser // net/http's body; nil on the fast path
	fast bool          // the body is the next left bytes of pc.br
	left int64
	pc   *h1Conn
	t    *h1Transport
	stop func() bool
	keep bool
	done bool
	err  error // sticky after the connection was released
}

func (b *h1Body) Read(p []byte) (int, error) {
	if b.done {
		if b.err == nil {
			b.err = io.EOF
		}
		return 0, b.err
	}
	var n int
	var err error
	if b.fast {
		n, err = b.readFast(p)
	} else {
		n, err = b.rc.Read(p)
	}
	if err != nil {
		b.err = err
		b.release(errors.Is(err, io.EOF))
	}
	return n, err
}

// readFast reads the rest of a Content-Length body as net/http's body does:
// io.EOF with the last bytes, io.ErrUnexpectedEOF when the upstream closes
// early.
func (b *h1Body) readFast(p []byte) (int, error) {
	if b.left == 0 {
		return 0, io.EOF
	}
	if int64(len(p)) > b.left {
		p = p[:b.left]
	}
	n, err := b.pc.br.Read(p)
	b.left -= int64(n)
	switch {
	case b.left == 0:
		err = io.EOF
	case err == io.EOF:
		err = io.ErrUnexpectedEOF
	}
	return n, err
}

func (b *h1Body) Close() error {
	if !b.done {
		b.release(false) // closes the connection first, so Close does not drain
	}
	if b.rc == nil {
		return nil
	}
	return b.rc.Close()
}

func (b *h1Body) release(eof bool) {
	if b.done {
		return
	}
	b.done = true
	intact := b.stop() // false: the context fired and set a past deadline
	if eof && intact && b.keep && b.pc.br.Buffered() == 0 {
		b.t.put(b.pc)
		return
	}
	b.pc.Close()
	b.t.closed1(b.pc)
}

// get returns a pooled live connection to addr or dials one, waiting for a
// free slot when the endpoint is at its connection limit.
func (t *h1Transport) get(ctx context.Context, addr string, fresh bool) (*h1Conn, error) {
	for {
		t.mu.Lock()
		if t.closed {
			t.mu.Unlock()
			return nil, errH1TransportClosed
		}
		h := t.host(addr)
		var pc *h1Conn
		for !fresh && len(h.idle) > 0 {
			pc = h.idle[len(h.idle)-1]
			h.idle = h.idle[:len(h.idle)-1]
			if time.Since(pc.idleAt) <= t.idleTimeout {
				break
			}
			h.conns--
			pc.Close()
			pc = nil
		}
		if pc != nil {
			t.mu.Unlock()
			// One MSG_PEEK syscall per reuse (~2% of a hop's CPU): without
			// it, a POST on a connection the upstream just closed is a 502.
			if pc.alive() {
				pc.reused = true
				return pc, nil
			}
			pc.Close()
			t.closed1(pc)
			continue
		}
		if t.perHost > 0 && h.conns >= t.perHost {
			ch := make(chan *h1Conn, 1)
			h.waiters = append(h.waiters, ch)
			t.mu.Unlock()
			select {
			case pc := <-ch:
				if pc == nil {
					return t.dialReserved(ctx, addr)
				}
				pc.reused = true
				return pc, nil
			case <-ctx.Done():
				t.mu.Lock()
				for i, w := range h.waiters {
					if w == ch {
						h.waiters = append(h.waiters[:i], h.waiters[i+1:]...)
						break
					}
				}
				t.mu.Unlock()
				// A hand-off may have raced with the cancellation.
				select {
				case pc := <-ch:
					if pc == nil {
						t.closed1(&h1Conn{addr: addr}) // pass the slot on
					} else {
						t.put(pc)
					}
				default:
				}
				return nil, context.Cause(ctx)
			}
		}
		h.conns++
		t.mu.Unlock()
		return t.dialReserved(ctx, addr)
	}
}

// dialReserved dials addr for a slot already counted in conns.
func (t *h1Transport) dialReserved(ctx context.Context, addr string) (*h1Conn, error) {
	c, err := t.dial(ctx, "tcp", addr)
	if err != nil {
		t.closed1(&h1Conn{addr: addr})
		return nil, err
	}
	pc := &h1Conn{Conn: c, addr: addr, br: bufio.NewReaderSize(c, 4<<10), bw: bufio.NewWriterSize(c, 4<<10)}
	if tc, ok := c.(*tls.Conn); ok {
		pc.tc = tc
		pc.nb, _ = tc.NetConn().(*tlsRawConn)
	}
	return pc, nil
}

func (t *h1Transport) host(addr string) *h1Host {
	h := t.hosts[addr]
	if h == nil {
		if t.hosts == nil {
			t.hosts = map[string]*h1Host{}
		}
		h = &h1Host{}
		t.hosts[addr] = h
	}
	return h
}

// put returns a healthy connection: to a waiter, else to the idle list.
func (t *h1Transport) put(pc *h1Conn) {
	t.mu.Lock()
	h := t.host(pc.addr)
	if len(h.waiters) > 0 {
		ch := h.waiters[0]
		h.waiters = h.waiters[1:]
		t.mu.Unlock()
		ch <- pc
		return
	}
	if t.closed {
		h.conns--
		t.mu.Unlock()
		pc.Close()
		return
	}
	now := time.Now()
	pc.idleAt = now
	h.idle = append(h.idle, pc)
	// Close connections over the idle limit or idle too long (oldest first).
	var drop []*h1Conn
	for len(h.idle) > 0 && (len(h.idle) > t.maxIdle || now.Sub(h.idle[0].idleAt) > t.idleTimeout) {
		drop = append(drop, h.idle[0])
		h.idle = h.idle[1:]
		h.conns--
	}
	t.mu.Unlock()
	for _, c := range drop {
		c.Close()
	}
}

// closed1 accounts for a closed (or never established) connection to
// pc.addr: its slot goes to a waiter, if any.
func (t *h1Transport) closed1(pc *h1Conn) {
	t.mu.Lock()
	h := t.host(pc.addr)
	if len(h.waiters) > 0 {
		ch := h.waiters[0]
		h.waiters = h.waiters[1:]
		t.mu.Unlock()
		ch <- nil // the slot passes on
		return
	}
	h.conns--
	t.forget(pc.addr, h)
	t.mu.Unlock()
}

// forget drops an endpoint's empty pool, so that passthrough traffic to
// many destinations does not grow the map. Called with t.mu held.
func (t *h1Transport) forget(addr string, h *h1Host) {
	if h.conns <= 0 && len(h.idle) == 0 && len(h.waiters) == 0 {
		delete(t.hosts, addr)
	}
}

// CloseIdleConnections closes every idle connection; with the transport
// closed, busy ones are closed when their response ends.
func (t *h1Transport) CloseIdleConnections() {
	t.mu.Lock()
	var drop []*h1Conn
	for addr, h := range t.hosts {
		drop = append(drop, h.idle...)
		h.conns -= len(h.idle)
		h.idle = nil
		t.forget(addr, h)
	}
	t.mu.Unlock()
	for _, c := range drop {
		c.Close()
	}
}

// close stops pooling and closes the idle connections.
func (t *h1Transport) close() {
	t.mu.Lock()
	t.closed = true
	t.mu.Unlock()
	t.CloseIdleConnections()
}

// alive checks a pooled connection without blocking: a connection the
// upstream closed (or that has unexpected bytes) must not carry a request.
//
// On a TLS connection bytes may legitimately be pending: TLS 1.3 records
// the server sends outside any response (a NewSessionTicket, a KeyUpdate).
// They are handed to crypto/tls to consume without waiting; the connection
// stays usable only if that leaves no application data, alert or EOF.
func (pc *h1Conn) alive() bool {
	if pc.br.Buffered() > 0 {
		return false
	}
	if pc.raw == nil {
		under := pc.Conn
		if pc.tc != nil {
			if pc.nb == nil {
				return true // not ours to peek under
			}
			under = pc.nb.Conn
		}
		sc, ok := under.(syscall.Conn)
		if !ok {
			return true
		}
		rc, err := sc.SyscallConn()
		if err != nil {
			return false
		}
		pc.raw = rc
		pc.peekFn = pc.peek
	}
	pc.live, pc.pending = true, false
	if err := pc.raw.Read(pc.peekFn); err != nil {
		return false
	}
	if pc.pending && pc.nb != nil {
		return pc.drainTLS()
	}
	return pc.live
}

// peek is alive's non-blocking MSG_PEEK; only one goroutine owns pc here.
// It calls recvfrom(2) without asking for the source address: unix.Recvfrom
// allocates a sockaddr buffer on every call, and this runs once per request
// on a reused connection.
func (pc *h1Conn) peek(fd uintptr) bool {
	n, _, errno := unix.Syscall6(unix.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&pc.peekB[0])), uintptr(len(pc.peekB)),
		unix.MSG_PEEK|unix.MSG_DONTWAIT, 0, 0)
	// EAGAIN: nothing to read, open. Success: EOF or unexpected bytes.
	pc.live = errno == unix.EAGAIN || errno == unix.EINTR
	pc.pending = errno == 0 && n > 0
	return true // never wait for readiness
}

// drainTLS lets crypto/tls read the pending records without blocking. A
// post-handshake message is consumed and the read ends with errWouldBlock:
// the connection is good. Application data (unexpected on an idle
// HTTP/1.1 connection), a close_notify or other alert, or EOF: it is not.
func (pc *h1Conn) drainTLS() bool {
	pc.nb.nonblock = true
	n, err := pc.tc.Read(pc.peekB[:])
	pc.nb.nonblock = false
	return n == 0 && errors.Is(err, errWouldBlock)
}
