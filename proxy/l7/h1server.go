package l7

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"runtime"
	"sync"
	"time"

	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7/h1"
	"github.com/meshlet/meshlet/proxy/sniff"
)

// The downstream HTTP/1.1 codec.
//
// Every downstream HTTP connection starts here. Requests in the common
// shape — HTTP/1.1, origin-form target, Host present, no body or a body of
// known length up to h1.MaxBody, no Upgrade, no Expect, no
// Transfer-Encoding, the whole header within h1.ReadBufSize — are parsed in
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

// h1WatchAfter is how long a request may wait for its response before the
// connection is watched for the client closing it.
const h1WatchAfter = 100 * time.Millisecond

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
	ctx context.Context // the connection's context (carries connKey)

	cancel context.CancelFunc
	tmpl   *http.Request // zero request carrying ctx; copied per request
	remote string

	// Reused per request (see serveOne).
	parser h1.Parser
	body   h1.Body
	bufp   *[]byte // pooled request body buffer while a request holds one
	w      h1.ResponseWriter

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
	c.br = h1.GetReader(tc)
	c.timer = time.AfterFunc(time.Hour, c.watch)
	c.timer.Stop()
	c.w.MustClose = c.mustClose

	d.addH1(c)
	stopCtx := context.AfterFunc(ctx, func() { _ = tc.Conn.Close() })
	defer func() {
		stopCtx()
		cancel()
		d.removeH1(c)
		c.timer.Stop()
		c.releaseBody()
		h1.PutReader(c.br)
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
	maxHead := min(orInt(lim.MaxHeaderBytes, 64<<10), h1.ReadBufSize)
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
	w.Reset(r, c.tc)
	c.watchStart()
	ok := c.serve(w, r)
	c.watchStop()
	c.releaseBody()
	if ok {
		ok = w.Finish() == nil
	}
	if !ok || w.CloseAfter() || c.watchErr != nil {
		c.tc.Close()
		return nil, true
	}
	return nil, false
}

// serve runs the handler; false means the response was aborted and the
// connection must be closed (as net/http does for http.ErrAbortHandler).
func (c *h1ServerConn) serve(w *h1.ResponseWriter, r *http.Request) (ok bool) {
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

// mustClose is the response writer's MustClose: a draining direction
// closes the connection after its response unless the connection moves to
// the next generation (it then stays keep-alive).
func (c *h1ServerConn) mustClose() bool { return c.d.draining.Load() && c.target() == nil }

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
