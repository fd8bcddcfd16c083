package l7

import (
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7/grpcwire"
	"github.com/meshlet/meshlet/proxy/l7/route"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
	"github.com/meshlet/meshlet/proxy/mtls"
	"github.com/meshlet/meshlet/proxy/sniff"
)

// The HTTP/2 frame forwarder serves h2c downstream connections at frame
// level (like Envoy's codec), instead of net/http's server, ReverseProxy
// and Transport: one reader goroutine per downstream and per upstream
// connection, one writer goroutine per connection that sends whole batches,
// request and response headers re-encoded per connection (HPACK state is
// per connection), DATA forwarded within both sides' flow-control windows.
// Routing, load balancing, circuit breaking, outlier detection, timeouts,
// retries, faults, metrics and the access log are the engine's own.
//
// It serves a connection only when every route the connection could take
// needs nothing it lacks (see h2Supported); other connections stay on the
// net/http path.

// h2state is the Engine's frame-forwarder state.
type h2state struct {
	conns   sync.Map // *h2down → struct{}
	pools   sync.Map // h2poolKey → *h2pool
	maxHdr  uint32
	maxStr  uint32
	hdrWait time.Duration
	idle    time.Duration
	served  atomic.Int64 // connections served (tests check which path ran)
	outMax  atomic.Int64 // bytes waiting for a peer before it is disconnected (h2OutMax; tests lower it)
}

// h2gate says, per port, whether the frame forwarder may serve a table's
// connections.
type h2gate struct {
	on    bool
	inOK  bool            // inbound connections qualify
	anyOK bool            // ports without a port-specific service qualify
	ports map[uint16]bool // ports with port-specific services
}

// initH2 sets the frame forwarder's limits.
func (p *Engine) initH2() {
	h := &p.h2
	h.outMax.Store(h2OutMax)
	h.maxHdr = uint32(orInt(p.lim.MaxHeaderBytes, 64<<10))
	h.maxStr = orU32(p.lim.MaxConcurrentStreams, 250)
	h.hdrWait = orDur(p.lim.ReadHeaderTimeout.D, 10*time.Second)
	h.idle = orDur(p.lim.IdleTimeout.D, 5*time.Minute)
}

// newH2Gate decides, per port, whether the frame forwarder may serve it:
// every route of every service on the port (and the passthrough) must be
// supported by it.
func newH2Gate(t *table) h2gate {
	h := h2gate{on: t.cfg.HTTP2Forwarder != config.H2NetHTTP}
	h.inOK = h2ClusterOK(t.inbound)
	h.anyOK = h2ClusterOK(t.passthrough)
	h.ports = map[uint16]bool{}
	for _, s := range t.services {
		ok := true
		for _, r := range s.Routes {
			ok = ok && h2RouteOK(r)
		}
		if len(s.Ports) == 0 {
			h.anyOK = h.anyOK && ok
			continue
		}
		for port := range s.Ports {
			if v, seen := h.ports[port]; seen {
				h.ports[port] = v && ok
			} else {
				h.ports[port] = ok
			}
		}
	}
	for port, ok := range h.ports {
		h.ports[port] = ok && h.anyOK
	}
	return h
}

// h2RouteOK: mirroring stays on the net/http path (it copies whole
// requests). A destination without a cluster is answered locally (NC).
func h2RouteOK(r *route.Route) bool {
	if r.Mirror != nil {
		return false
	}
	for _, d := range r.Dests {
		if d.Cluster != nil && !h2ClusterOK(d.Cluster) {
			return false
		}
	}
	return true
}

// h2ClusterOK: the upstream must speak HTTP/2 (http2 or auto, which uses
// HTTP/2 for HTTP/2 requests), and the connection-count and pending-request
// limits, which the forwarder's pool does not enforce, must be unset.
func h2ClusterOK(c *upstream.Cluster) bool {
	return c != nil && c.TLS() == nil && c.Protocol() != "http1" && c.Config().Pool.MaxConnections == 0 && c.Config().Pool.MaxPendingRequests == 0
}

// h2Serves reports whether an HTTP/2 connection to port (in dir) is served
// by the frame forwarder.
func (p *Engine) h2Serves(port uint16, dir l4.Direction) bool {
	h := &p.tab.Load().h2
	if !h.on {
		return false
	}
	if dir == l4.Inbound {
		return h.inOK
	}
	if v, ok := h.ports[port]; ok {
		return v
	}
	return h.anyOK
}

// serveMaybeH2 serves c with the frame forwarder when it is an HTTP/2
// connection the forwarder may take (res is the detection result, or nil
// on a declared port, where the preface is peeked here). It returns the
// connection to use otherwise (peeked bytes are replayed).
func (p *Engine) serveMaybeH2(ctx context.Context, c net.Conn, res *sniff.Result, dst netip.AddrPort, dir l4.Direction) (net.Conn, bool) {
	if !p.h2Serves(dst.Port(), dir) {
		return c, false
	}
	if res != nil {
		if res.Protocol != sniff.HTTP2 {
			return c, false
		}
	} else {
		pc, isH2 := peekPreface(c, p.h2.hdrWait)
		if !isH2 {
			return pc, false
		}
		c = pc
	}
	d := p.dirs[dir]
	if d.closed.Load() {
		c.Close()
		return nil, true
	}
	// Draining: served even so, starting with GOAWAY (serveH2), so streams
	// the client sends before it reads the GOAWAY are answered.
	d.conns.Add(1)
	defer d.conns.Done()
	p.serveH2(ctx, c, dst, dir)
	return nil, true
}

// peekPreface reads just enough to tell the HTTP/2 preface from HTTP/1.
func peekPreface(c net.Conn, wait time.Duration) (net.Conn, bool) {
	_ = c.SetReadDeadline(time.Now().Add(wait))
	defer func() { _ = c.SetReadDeadline(time.Time{}) }()
	buf := make([]byte, 0, len(sniff.Preface))
	for len(buf) < len(sniff.Preface) {
		n, err := c.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if !strings.HasPrefix(sniff.Preface, string(buf)) || err != nil {
			return sniff.NewConn(c, buf), false
		}
	}
	return sniff.NewConn(c, buf), true
}

// h2down is a downstream (client) connection. Its mu (h2conn.mu) guards the
// connection and the state of all its streams. Lock order: h2down.mu →
// h2pool.mu → h2up.mu.
type h2down struct {
	h2conn
	p       *Engine
	dst     netip.AddrPort
	dir     l4.Direction
	remote  string
	tls     *tls.ConnectionState // inbound mutual TLS (nil: plain text)
	streams map[uint32]*h2stream
	lastID  uint32
	goaway  bool // final GOAWAY sent: no new streams
	gaPing  bool // graceful close announced (first GOAWAY and its PING sent)
	peerGA  bool // the client sent GOAWAY
	resets  int  // streams the client cancelled
	done    int  // streams completed
	lastUse time.Time
	idle    *time.Timer
}

// serveH2 serves one HTTP/2 connection until it ends.
func (p *Engine) serveH2(ctx context.Context, nc net.Conn, dst netip.AddrPort, dir l4.Direction) {
	p.h2.served.Add(1)
	d := &h2down{p: p, dst: dst, dir: dir, streams: map[uint32]*h2stream{}, lastUse: time.Now()}
	d.init(nc, p.h2.maxHdr)
	if a := nc.RemoteAddr(); a != nil {
		d.remote = a.String()
	}
	d.tls = mtls.ConnState(nc)
	p.h2.conns.Store(d, struct{}{})
	defer p.h2.conns.Delete(d)
	stopCtx := context.AfterFunc(ctx, func() { nc.Close() })
	defer stopCtx()
	defer nc.Close()

	_ = nc.SetReadDeadline(time.Now().Add(p.h2.hdrWait))
	var pre [len(sniff.Preface)]byte
	if _, err := io.ReadFull(d.br, pre[:]); err != nil || string(pre[:]) != sniff.Preface {
		return
	}
	d.mu.Lock()
	_ = d.fr.WriteSettings(
		http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: p.h2.maxStr},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: h2StreamWin},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: p.h2.maxHdr},
	)
	_ = d.fr.WriteWindowUpdate(0, h2ConnWin-h2InitWin)
	d.recvWin = h2ConnWin
	d.mu.Unlock()
	d.kick()
	go d.writeLoop(d.resume)
	defer d.stop()
	if p.dirs[dir].draining.Load() {
		d.goAway(http2.ErrCodeNo)
	}
	d.idle = time.AfterFunc(p.h2.idle, d.onIdle)
	defer d.idle.Stop()

	fs := &flushSet{}
	first := true
	linger := false // a connection error was answered with GOAWAY
	for {
		f, err := d.fr.ReadFrame()
		if first && err == nil {
			if _, ok := f.(*http2.SettingsFrame); !ok {
				err = http2.ConnectionError(http2.ErrCodeProtocol)
			}
			first = false
			_ = nc.SetReadDeadline(time.Time{})
		}
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				d.mu.Lock()
				d.streamError(se.StreamID, se.Code, fs)
				d.mu.Unlock()
				continue
			}
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				d.mu.Lock()
				d.goaway = true
				_ = d.fr.WriteGoAway(d.lastID, http2.ErrCode(ce), nil)
				d.mu.Unlock()
				linger = true
			}
			break
		}
		d.mu.Lock()
		ferr := d.onFrame(f, fs)
		var ce http2.ConnectionError
		if errors.As(ferr, &ce) {
			d.goaway = true
			_ = d.fr.WriteGoAway(d.lastID, http2.ErrCode(ce), nil)
		}
		d.mu.Unlock()
		if ferr != nil {
			linger = errors.As(ferr, &ce)
			break
		}
		if d.backlogged(p.h2.outMax.Load()) {
			d.p.log.Warn("http2 client does not read what it asks for; closing", "remote", d.remote)
			break
		}
		if d.br.Buffered() == 0 {
			fs.flush()
		}
	}
	fs.flush()
	d.teardown()
	if linger {
		// Let the client read the GOAWAY: closing with its input unread
		// would reset the connection and may drop it.
		d.flush()
		_ = nc.SetReadDeadline(time.Now().Add(time.Second))
		_, _ = io.Copy(io.Discard, d.br)
	}
}

func connErr(code http2.ErrCode) error { return http2.ConnectionError(code) }

// onFrame handles one frame from the client (mu held). A non-nil error is a
// connection error.
func (d *h2down) onFrame(f http2.Frame, fs *flushSet) error {
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		return d.onHeaders(f, fs)
	case *http2.DataFrame:
		return d.onData(f, fs)
	case *http2.RSTStreamFrame:
		id := f.StreamID
		if id > d.lastID || id%2 == 0 {
			return connErr(http2.ErrCodeProtocol)
		}
		if s := d.streams[id]; s != nil {
			d.resets++
			s.st.flags = addFlag(s.st.flags, "DC")
			s.cancelUp(http2.ErrCodeCancel, fs)
			s.finish(fs)
			if d.resets > h2ResetsLimit && d.resets > d.done {
				// Rapid reset (CVE-2023-44487): more streams cancelled than
				// completed.
				d.p.log.Warn("http2 client cancels streams faster than it completes them; closing", "remote", d.remote, "cancelled", d.resets, "completed", d.done)
				return connErr(http2.ErrCodeEnhanceYourCalm)
			}
		}
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
		}
		var err error
		_ = f.ForeachSetting(func(s http2.Setting) error {
			if verr := s.Valid(); verr != nil {
				err = connErr(http2.ErrCodeProtocol)
				if s.ID == http2.SettingInitialWindowSize {
					err = connErr(http2.ErrCodeFlowControl)
				}
				return verr
			}
			switch s.ID {
			case http2.SettingInitialWindowSize:
				delta := int64(s.Val) - d.peerInitWin
				d.peerInitWin = int64(s.Val)
				for _, st := range d.streams {
					st.downWin += delta
				}
				if delta > 0 {
					d.resumeLocked(fs)
				}
			case http2.SettingMaxFrameSize:
				d.peerMaxFrame = s.Val
			case http2.SettingHeaderTableSize:
				d.enc.SetMaxDynamicTableSizeLimit(s.Val)
			}
			return nil
		})
		if err != nil {
			return err
		}
		_ = d.fr.WriteSettingsAck()
		fs.add(&d.h2conn)
	case *http2.PingFrame:
		if !f.IsAck() {
			_ = d.fr.WritePing(true, f.Data)
			fs.add(&d.h2conn)
		} else if f.Data == goAwayPing && d.gaPing {
			if d.finalGoAwayLocked() {
				d.closeSoon()
			}
			fs.add(&d.h2conn)
		}
	case *http2.WindowUpdateFrame:
		if f.StreamID == 0 {
			if d.sendWin+int64(f.Increment) > 1<<31-1 {
				return connErr(http2.ErrCodeFlowControl)
			}
			d.sendWin += int64(f.Increment)
			d.resumeLocked(fs)
			return nil
		}
		if f.StreamID > d.lastID {
			return connErr(http2.ErrCodeProtocol)
		}
		if s := d.streams[f.StreamID]; s != nil {
			if s.downWin+int64(f.Increment) > 1<<31-1 {
				d.streamError(f.StreamID, http2.ErrCodeFlowControl, fs)
				return nil
			}
			s.downWin += int64(f.Increment)
			s.pushResp(fs)
		}
	case *http2.GoAwayFrame:
		d.peerGA = true
		if len(d.streams) == 0 {
			return io.EOF
		}
	case *http2.PushPromiseFrame:
		return connErr(http2.ErrCodeProtocol)
	}
	return nil
}

// onHeaders opens a stream (request headers) or ends one (trailers).
func (d *h2down) onHeaders(f *http2.MetaHeadersFrame, fs *flushSet) error {
	id := f.StreamID
	if id%2 == 0 {
		return connErr(http2.ErrCodeProtocol)
	}
	if id <= d.lastID {
		s := d.streams[id]
		if s == nil {
			return nil // a stream we already ended (reset): ignore
		}
		if s.reqEnded || !f.StreamEnded() {
			d.streamError(id, http2.ErrCodeProtocol, fs)
			return nil
		}
		s.reqEnded = true
		s.reqTrailers = h2ForwardFields(f.RegularFields())
		s.pushReq(fs)
		s.maybeDone(fs)
		return nil
	}
	d.lastID = id
	if d.goaway || d.peerGA {
		_ = d.fr.WriteRSTStream(id, http2.ErrCodeRefusedStream)
		fs.add(&d.h2conn)
		return nil
	}
	if uint32(len(d.streams)) >= d.p.h2.maxStr {
		d.resets++ // refused streams count like cancellations
		_ = d.fr.WriteRSTStream(id, http2.ErrCodeRefusedStream)
		fs.add(&d.h2conn)
		if d.resets > h2ResetsLimit && d.resets > d.done {
			return connErr(http2.ErrCodeEnhanceYourCalm)
		}
		return nil
	}
	s := &h2stream{d: d, id: id, start: time.Now(), reqRecvWin: h2StreamWin, downWin: d.peerInitWin, reqEnded: f.StreamEnded()}
	s.st.dst = d.dst
	d.streams[id] = s
	s.open(f, fs)
	return nil
}

// onData forwards request body bytes.
func (d *h2down) onData(f *http2.DataFrame, fs *flushSet) error {
	id := f.StreamID
	if id > d.lastID {
		return connErr(http2.ErrCodeProtocol)
	}
	n := int64(f.Length)
	if n > d.recvWin {
		return connErr(http2.ErrCodeFlowControl)
	}
	d.recvWin -= n
	s := d.streams[id]
	if s == nil || s.reqEnded {
		d.consumed(n, fs)
		if s != nil {
			d.streamError(id, http2.ErrCodeStreamClosed, fs)
		}
		return nil
	}
	if n > s.reqRecvWin {
		d.consumed(n, fs)
		d.streamError(id, http2.ErrCodeFlowControl, fs)
		return nil
	}
	s.reqRecvWin -= n
	data := f.Data()
	if pad := n - int64(len(data)); pad > 0 {
		d.consumed(pad, fs)
		s.reqCredit(pad, fs)
	}
	s.reqEnded = f.StreamEnded()
	s.forwardReq(data, fs)
	if s.reqEnded {
		s.maybeDone(fs)
	}
	return nil
}

// streamError resets one stream of the client with code (mu held).
func (d *h2down) streamError(id uint32, code http2.ErrCode, fs *flushSet) {
	_ = d.fr.WriteRSTStream(id, code)
	fs.add(&d.h2conn)
	if s := d.streams[id]; s != nil {
		s.st.flags = addFlag(s.st.flags, "DPE")
		s.downReset = true
		s.cancelUp(http2.ErrCodeCancel, fs)
		s.finish(fs)
	}
}

// resume pushes response data of streams that waited for window or room.
func (d *h2down) resume() {
	fs := &flushSet{}
	d.mu.Lock()
	d.resumeLocked(fs)
	d.mu.Unlock()
	fs.flush()
}

func (d *h2down) resumeLocked(fs *flushSet) {
	for _, s := range d.takeBlocked() {
		s.blockedDown = false
		s.pushResp(fs)
	}
}

// goAwayPing is the PING that follows a graceful close's first GOAWAY.
var goAwayPing = [8]byte{'d', 'r', 'a', 'i', 'n', 'i', 'n', 'g'}

// goAwayAckWait bounds the wait for goAwayPing's answer: a client that does
// not answer it gets the final GOAWAY then.
const goAwayAckWait = time.Second

// goAway starts a graceful close: streams the client already opened finish,
// new ones are refused, the connection closes when the last one ends.
//
// A NO_ERROR close goes in two steps (RFC 9113 §6.8). The first GOAWAY
// names the highest stream there can be, and a PING follows it. A stream
// the client opens before it answers the PING was sent before the client
// read the GOAWAY: it is served. The answer means the client has read the
// GOAWAY and opens no more streams; only then the final GOAWAY names the
// last stream, later streams are refused with REFUSED_STREAM (the client
// may retry them elsewhere), and an idle connection closes. A single GOAWAY
// naming the last stream would race the client's next stream: refused at
// best, and lost in a reset if it arrives once the connection is closed.
// Other codes (errors) end the connection at once.
func (d *h2down) goAway(code http2.ErrCode) {
	d.mu.Lock()
	if code == http2.ErrCodeNo && !d.goaway {
		if !d.gaPing {
			d.gaPing = true
			_ = d.fr.WriteGoAway(1<<31-1, code, nil)
			_ = d.fr.WritePing(false, goAwayPing)
			time.AfterFunc(goAwayAckWait, d.finalGoAway)
		}
		d.mu.Unlock()
		d.kick()
		return
	}
	if !d.goaway {
		d.goaway = true
		_ = d.fr.WriteGoAway(d.lastID, code, nil)
	}
	idle := len(d.streams) == 0
	d.mu.Unlock()
	d.kick()
	if idle {
		d.closeSoon()
	}
}

// finalGoAway ends a graceful close's first step: the client answered its
// PING (or did not in time).
func (d *h2down) finalGoAway() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.finalGoAwayLocked() {
		d.closeSoon()
	}
	d.kick()
}

// finalGoAwayLocked sends the final GOAWAY (mu held) and reports whether
// the connection is idle and should close.
func (d *h2down) finalGoAwayLocked() bool {
	if d.goaway || d.failed {
		return false
	}
	d.goaway = true
	_ = d.fr.WriteGoAway(d.lastID, http2.ErrCodeNo, nil)
	return len(d.streams) == 0
}

// closeSoon flushes what is queued and closes the connection.
func (d *h2down) closeSoon() {
	go func() {
		d.flush()
		// Give the client a moment to read the last frames before the close
		// (a close with unread input may reset the connection).
		time.Sleep(50 * time.Millisecond)
		d.nc.Close()
	}()
}

func (d *h2down) onIdle() {
	d.mu.Lock()
	if d.failed {
		d.mu.Unlock()
		return
	}
	idle := len(d.streams) == 0 && time.Since(d.lastUse) >= d.p.h2.idle
	d.mu.Unlock()
	if idle {
		d.goAway(http2.ErrCodeNo)
		return
	}
	d.idle.Reset(d.p.h2.idle)
}

// teardown ends every stream of a closed connection.
func (d *h2down) teardown() {
	fs := &flushSet{}
	d.mu.Lock()
	d.failed = true
	for _, s := range d.streams {
		if !s.respDone {
			s.st.flags = addFlag(s.st.flags, "DC")
		}
		s.downReset = true
		s.cancelUp(http2.ErrCodeCancel, fs)
		s.finish(fs)
	}
	d.mu.Unlock()
	fs.flush()
}

// h2ForwardFields drops connection-specific fields.
func h2ForwardFields(in []hpack.HeaderField) []hpack.HeaderField {
	out := make([]hpack.HeaderField, 0, len(in))
	for _, f := range in {
		if !h2HopField(f.Name, f.Value) {
			out = append(out, f)
		}
	}
	return out
}

// h2stream is one proxied stream: a downstream stream and the upstream
// stream of its current attempt. All fields are guarded by d.mu.
type h2stream struct {
	d     *h2down
	id    uint32
	st    reqState
	req   *http.Request // the request as routing, logs and metrics see it
	start time.Time
	hdrs  []hpack.HeaderField // request headers for the upstream (no grpc-timeout)
	genID string              // x-request-id generated here (the client sent none)
	dc    decision            // the request's decision (request.go)
	// exactBody: the local reply's body is its message as is (RBAC).
	exactBody bool

	cl      *upstream.Cluster
	ep      *upstream.Endpoint
	counted bool // holds a circuit-breaker slot
	last    *upstream.Endpoint
	timer   *time.Timer
	perTry  *time.Timer

	// Current upstream attempt.
	u       *h2up
	uid     uint32
	waiting bool // waiting for an upstream connection
	t0      time.Time

	// Request direction (client → upstream).
	reqRecvWin  int64 // bytes the client may still send
	reqUnacked  int64
	reqEnded    bool // END_STREAM received
	reqQ        []byte
	reqTrailers []hpack.HeaderField
	reqSentEnd  bool
	replay      []byte // request bytes sent in this attempt, for a retry
	noReplay    bool
	sentOff     int64 // request bytes sent in this attempt
	sentMax     int64 // request bytes sent in any attempt (window returned)
	upWin       int64 // upstream stream send window
	blockedUp   bool

	// Response direction (upstream → client).
	respStarted  bool // final response headers sent downstream
	respQ        []byte
	respEnd      bool // END_STREAM received from upstream
	respTrailers []hpack.HeaderField
	respDone     bool // END_STREAM sent downstream
	downWin      int64
	upRecvWin    int64
	upUnacked    int64
	blockedDown  bool
	downReset    bool // the downstream stream was reset
	status       int
	grpcStatus   string
	bytes        int64
	closed       bool
}

// open routes a new request (d.mu held).
func (s *h2stream) open(f *http2.MetaHeadersFrame, fs *flushSet) {
	d := s.d
	p := d.p
	t := p.tab.Load()
	s.st.tab = t
	var method, path, authority string
	for _, hf := range f.PseudoFields() {
		switch hf.Name {
		case ":method":
			method = hf.Value
		case ":path":
			path = hf.Value
		case ":authority":
			authority = hf.Value
		case ":protocol":
			method = "" // extended CONNECT is not offered
		}
	}
	regular := f.RegularFields()
	hdr := make(http.Header, len(regular))
	for _, hf := range regular {
		if h2HopField(hf.Name, hf.Value) && hf.Name != "host" {
			continue
		}
		k := http.CanonicalHeaderKey(hf.Name)
		hdr[k] = append(hdr[k], hf.Value)
		if hf.Name == "host" && authority == "" {
			authority = hf.Value
		}
	}
	s.genID = ensureRequestID(hdr)
	u, err := url.ParseRequestURI(path)
	r := &http.Request{Method: method, Proto: "HTTP/2.0", ProtoMajor: 2, Header: hdr, Host: authority, RemoteAddr: d.remote, RequestURI: path, TLS: d.tls}
	s.req = r
	s.st.grpc = strings.HasPrefix(hdr.Get("Content-Type"), "application/grpc")
	if err != nil || method == "" || method == http.MethodConnect || f.Truncated {
		r.URL = &url.URL{Path: "/"}
		status, msg := http.StatusBadRequest, "malformed request"
		if f.Truncated {
			status, msg = http.StatusRequestHeaderFieldsTooLarge, "request headers too large"
		}
		s.st.flags = "DPE"
		s.localReply(status, 13, msg, fs)
		return
	}
	r.URL = u

	if p.refusePlaintext(t, d.dir, d.tls, d.dst) {
		// The connection predates STRICT on its port: refused unprocessed
		// and the connection ended; the client's retry on a new one is
		// refused at accept.
		s.refuse(fs)
		return
	}
	host := route.HostOnly(authority)
	rt := t.match(r, host, d.dir, d.dst)
	if rt != nil && !h2RouteOK(rt) {
		// An Update since the connection was accepted routes this request
		// where the forwarder cannot follow (TLS, HTTP/1.1 upstream,
		// mirroring, connection limits): refuse it unprocessed and end the
		// connection, so the client retries on a new one, served by the
		// path the new table chooses.
		s.refuse(fs)
		return
	}
	s.dc = p.decide(rt, r, s.st.grpc, d.dst)
	dc := &s.dc
	s.st.route, s.st.dest, s.st.retry, s.st.flags = dc.route, dc.dest, dc.retry, dc.flags
	if dc.reply == nil {
		dc.prepare(r, host)
		s.hdrs = s.upstreamHeaders(method, regular)
	}
	if dc.delay > 0 {
		s.waiting = true
		time.AfterFunc(dc.delay, func() {
			fs := &flushSet{}
			d.mu.Lock()
			if !s.closed {
				s.waiting = false
				s.afterDelay(fs)
			}
			d.mu.Unlock()
			fs.flush()
		})
		return
	}
	s.afterDelay(fs)
}

// afterDelay answers locally or dispatches the request (d.mu held).
func (s *h2stream) afterDelay(fs *flushSet) {
	if a := s.dc.reply; a != nil {
		s.exactBody = a.exact
		s.localReply(a.status, a.grpcCode, a.msg, fs)
		return
	}
	if timeout := s.dc.timeout; timeout > 0 {
		s.st.deadline = time.Now().Add(timeout)
		s.timer = time.AfterFunc(timeout, s.onTimeout)
	}
	cl := s.st.dest.Cluster
	s.cl = cl
	if !cl.Admit() {
		s.fail(upstream.ErrOverflow, fs)
		return
	}
	s.counted = true
	s.dispatch(fs)
}

// refuse resets a new stream with REFUSED_STREAM (it was not processed, so
// the client may retry it anywhere) and sends GOAWAY naming the streams
// before it, so the client opens a new connection (d.mu held).
func (s *h2stream) refuse(fs *flushSet) {
	d := s.d
	delete(d.streams, s.id)
	s.closed = true
	if !d.goaway {
		d.goaway = true
		_ = d.fr.WriteGoAway(max(s.id, 2)-2, http2.ErrCodeNo, nil)
	}
	_ = d.fr.WriteRSTStream(s.id, http2.ErrCodeRefusedStream)
	fs.add(&d.h2conn)
	if len(d.streams) == 0 {
		d.closeSoon()
	}
}

// upstreamHeaders builds the request header list for the upstream from the
// (possibly rewritten) request.
func (s *h2stream) upstreamHeaders(method string, regular []hpack.HeaderField) []hpack.HeaderField {
	r := s.req
	out := make([]hpack.HeaderField, 0, len(regular)+4)
	out = append(out,
		hpack.HeaderField{Name: ":method", Value: method},
		hpack.HeaderField{Name: ":scheme", Value: "http"},
		hpack.HeaderField{Name: ":authority", Value: r.Host},
		hpack.HeaderField{Name: ":path", Value: r.URL.RequestURI()},
	)
	if s.st.route.Config.Headers == nil {
		for _, f := range regular {
			switch f.Name {
			case "grpc-timeout":
				continue
			case "x-forwarded-client-cert":
				if s.st.route.Inbound {
					continue // replaced by decide (setXFCC)
				}
			}
			if !h2HopField(f.Name, f.Value) {
				out = append(out, f)
			}
		}
		if v := r.Header[mtls.XFCCHeader]; s.st.route.Inbound && len(v) > 0 {
			out = append(out, hpack.HeaderField{Name: "x-forwarded-client-cert", Value: v[0]})
		}
		if s.genID != "" {
			out = append(out, hpack.HeaderField{Name: "x-request-id", Value: s.genID})
		}
		return out
	}
	// Header operations were applied to r.Header: send that.
	for k, vs := range r.Header {
		lk := strings.ToLower(k)
		switch lk {
		case "grpc-timeout", "host":
			continue
		}
		for _, v := range vs {
			if !h2HopField(lk, v) {
				out = append(out, hpack.HeaderField{Name: lk, Value: v})
			}
		}
	}
	return out
}

// dispatch starts an attempt: picks an endpoint and gets a stream on one of
// its connections (d.mu held).
func (s *h2stream) dispatch(fs *flushSet) {
	cl := s.cl
	ep := cl.Pick(s.st.dest.Subset, s.d.dst, s.last)
	if ep == nil {
		s.fail(upstream.ErrNoEndpoint, fs)
		return
	}
	s.ep, s.last = ep, ep
	s.st.upstream = ep.Addr()
	s.st.attempts++
	ep.Begin()
	s.t0 = time.Now()
	if rp := s.st.retry; rp != nil && rp.PerTry > 0 {
		s.perTry = time.AfterFunc(rp.PerTry, s.onPerTry)
	}
	s.d.p.h2pool(cl, ep.Addr(), s.d.dir).acquire(s, fs)
}

// attach sends the request on stream uid of u (d.mu and u.mu held).
func (s *h2stream) attach(u *h2up, fs *flushSet) {
	s.waiting = false
	s.u = u
	s.uid = u.nextID
	u.nextID += 2
	u.streams[s.uid] = s
	s.upWin = u.peerInitWin
	s.upRecvWin = h2StreamWin
	s.upUnacked = 0
	s.sentOff = 0
	s.reqSentEnd = false
	if len(s.replay) > 0 {
		s.reqQ = append(s.replay, s.reqQ...)
		s.replay = nil
	}
	hdrs := s.hdrs
	if s.st.grpc && !s.st.deadline.IsZero() {
		hdrs = append(hdrs[:len(hdrs):len(hdrs)], hpack.HeaderField{Name: "grpc-timeout", Value: grpcwire.FormatTimeout(time.Until(s.st.deadline))})
	}
	end := s.reqEnded && len(s.reqQ) == 0 && s.reqTrailers == nil
	u.writeHeaders(s.uid, hdrs, end)
	s.reqSentEnd = end
	fs.add(&u.h2conn)
	s.pushReqLocked(fs)
}

// forwardReq sends request bytes upstream, queueing what the windows do not
// allow yet (d.mu held).
func (s *h2stream) forwardReq(data []byte, fs *flushSet) {
	u := s.u
	if u == nil || len(s.reqQ) > 0 {
		s.reqQ = append(s.reqQ, data...)
		s.pushReq(fs)
		return
	}
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.failed {
		s.reqQ = append(s.reqQ, data...)
		return
	}
	end := s.reqEnded && s.reqTrailers == nil
	n, ended := u.sendData(s.uid, &s.upWin, data, end)
	s.sentReq(data[:n], fs)
	if ended {
		s.reqSentEnd = true
	}
	if n < len(data) {
		s.reqQ = append(s.reqQ, data[n:]...)
		s.blockUp()
	} else if s.reqEnded && !s.reqSentEnd {
		s.pushReqLocked(fs)
	}
	if n > 0 || ended {
		fs.add(&u.h2conn)
	}
}

func (s *h2stream) pushReq(fs *flushSet) {
	u := s.u
	if u == nil {
		return
	}
	u.mu.Lock()
	s.pushReqLocked(fs)
	u.mu.Unlock()
}

// pushReqLocked sends queued request data, then trailers or END_STREAM
// (d.mu and u.mu held).
func (s *h2stream) pushReqLocked(fs *flushSet) {
	u := s.u
	if u.failed || s.reqSentEnd {
		return
	}
	if len(s.reqQ) > 0 {
		n, ended := u.sendData(s.uid, &s.upWin, s.reqQ, s.reqEnded && s.reqTrailers == nil)
		s.sentReq(s.reqQ[:n], fs)
		s.reqQ = s.reqQ[n:]
		if len(s.reqQ) == 0 {
			s.reqQ = nil
		}
		s.reqSentEnd = ended
		if n > 0 || ended {
			fs.add(&u.h2conn)
		}
		if len(s.reqQ) > 0 {
			s.blockUp()
			return
		}
	}
	if s.reqEnded && !s.reqSentEnd {
		if s.reqTrailers != nil {
			u.writeHeaders(s.uid, s.reqTrailers, true)
		} else {
			_ = u.fr.WriteData(s.uid, true, nil)
		}
		s.reqSentEnd = true
		fs.add(&u.h2conn)
	}
}

func (s *h2stream) blockUp() {
	if !s.blockedUp {
		s.blockedUp = true
		s.u.block(s)
	}
}

// sentReq records bytes that went upstream: their window goes back to the
// client, and they are kept for a retry while the response has not started.
func (s *h2stream) sentReq(b []byte, fs *flushSet) {
	if len(b) == 0 {
		return
	}
	if !s.noReplay && !s.respStarted {
		if len(s.replay)+len(b) <= h2MaxReplay {
			s.replay = append(s.replay, b...)
		} else {
			s.noReplay, s.replay = true, nil
		}
	}
	// Replayed bytes were credited when first sent.
	s.sentOff += int64(len(b))
	if n := s.sentOff - s.sentMax; n > 0 {
		s.sentMax = s.sentOff
		s.d.consumed(n, fs)
		s.reqCredit(n, fs)
	}
}

// reqCredit returns stream window to the client (d.mu held).
func (s *h2stream) reqCredit(n int64, fs *flushSet) {
	s.reqUnacked += n
	if !s.reqEnded && s.reqUnacked >= h2StreamWin/4 {
		_ = s.d.fr.WriteWindowUpdate(s.id, uint32(s.reqUnacked))
		s.reqRecvWin += s.reqUnacked
		s.reqUnacked = 0
		fs.add(&s.d.h2conn)
	}
}

// respHeaders handles response headers or trailers from the upstream
// (d.mu held).
func (s *h2stream) respHeaders(fields []hpack.HeaderField, end bool, fs *flushSet) {
	d := s.d
	if s.respStarted {
		if !end {
			s.resetBoth(http2.ErrCodeProtocol, fs)
			return
		}
		s.respEnd = true
		s.respTrailers = s.responseFields(fields)
		for _, f := range fields {
			if f.Name == "grpc-status" {
				s.grpcStatus = f.Value
			}
		}
		s.pushResp(fs)
		return
	}
	status := 0
	var gs string
	for _, f := range fields {
		switch f.Name {
		case ":status":
			status, _ = strconv.Atoi(f.Value)
		case "grpc-status":
			gs = f.Value
		}
	}
	if status < 100 || status > 999 {
		s.attemptFailed(errors.New("upstream sent a malformed response"), http2.ErrCodeProtocol, fs)
		return
	}
	if status < 200 {
		if !end { // informational: pass on
			d.writeHeaders(s.id, s.responseFields(fields), false)
			fs.add(&d.h2conn)
		}
		return
	}
	s.stopPerTry()
	o := upstream.OutcomeOK
	switch {
	case status == 502 || status == 503 || status == 504:
		o = upstream.OutcomeGateway
	case status >= 500:
		o = upstream.Outcome5xx
	}
	s.ep.ObserveRTT(time.Since(s.t0), time.Now())
	s.cl.Record(s.ep, o)
	if rp := s.st.retry; rp != nil && s.canRetry() {
		resp := &http.Response{StatusCode: status, Header: http.Header{}}
		if gs != "" && end {
			resp.Header.Set("Grpc-Status", gs)
		}
		if rp.Retriable(resp, nil) && s.retry(fs) {
			return
		}
	}
	s.respStarted = true
	s.replay, s.noReplay = nil, true
	s.status = status
	s.grpcStatus = gs
	d.writeHeaders(s.id, s.responseFields(fields), end && len(s.respQ) == 0)
	fs.add(&d.h2conn)
	if end {
		s.respEnd = true
		s.respDone = true
		s.maybeDone(fs)
	}
}

// responseFields drops connection-specific fields and applies the route's
// response header operations.
func (s *h2stream) responseFields(in []hpack.HeaderField) []hpack.HeaderField {
	out := h2ForwardFields(in)
	if rt := s.st.route; rt != nil && rt.Config.Headers != nil {
		ops := &rt.Config.Headers.Response
		if len(ops.Remove)+len(ops.Set)+len(ops.Add) > 0 {
			out = h2HeaderOps(out, ops)
		}
	}
	return out
}

// h2HeaderOps applies header operations to a field list.
func h2HeaderOps(in []hpack.HeaderField, ops *config.HeaderOps) []hpack.HeaderField {
	drop := func(name string) bool {
		for _, k := range ops.Remove {
			if strings.EqualFold(k, name) {
				return true
			}
		}
		for k := range ops.Set {
			if strings.EqualFold(k, name) {
				return true
			}
		}
		return false
	}
	out := in[:0:0]
	for _, f := range in {
		if f.IsPseudo() || !drop(f.Name) {
			out = append(out, f)
		}
	}
	for k, v := range ops.Set {
		out = append(out, hpack.HeaderField{Name: strings.ToLower(k), Value: v})
	}
	for k, v := range ops.Add {
		out = append(out, hpack.HeaderField{Name: strings.ToLower(k), Value: v})
	}
	return out
}

// forwardResp sends response bytes downstream (d.mu held, u.mu not held).
func (s *h2stream) forwardResp(data []byte, end bool, fs *flushSet) {
	if end {
		s.respEnd = true
	}
	if s.respDone || s.downReset {
		s.upCredit(int64(len(data)), fs)
		return
	}
	d := s.d
	if len(s.respQ) == 0 {
		n, ended := d.sendData(s.id, &s.downWin, data, end && s.respTrailers == nil)
		s.bytes += int64(n)
		s.upCredit(int64(n), fs)
		if n > 0 || ended {
			fs.add(&d.h2conn)
		}
		if ended {
			s.respDone = true
			s.maybeDone(fs)
			return
		}
		data = data[n:]
		if len(data) == 0 {
			if end {
				s.pushResp(fs)
			}
			return
		}
	}
	s.respQ = append(s.respQ, data...)
	s.pushResp(fs)
}

// pushResp sends queued response data, then trailers or END_STREAM (d.mu held).
func (s *h2stream) pushResp(fs *flushSet) {
	d := s.d
	if s.respDone || s.downReset || !s.respStarted {
		return
	}
	if len(s.respQ) > 0 {
		n, ended := d.sendData(s.id, &s.downWin, s.respQ, s.respEnd && s.respTrailers == nil)
		s.bytes += int64(n)
		s.upCredit(int64(n), fs)
		s.respQ = s.respQ[n:]
		if len(s.respQ) == 0 {
			s.respQ = nil
		}
		if n > 0 || ended {
			fs.add(&d.h2conn)
		}
		if ended {
			s.respDone = true
			s.maybeDone(fs)
			return
		}
		if len(s.respQ) > 0 {
			if !s.blockedDown {
				s.blockedDown = true
				d.block(s)
			}
			return
		}
	}
	if s.respEnd {
		if s.respTrailers != nil {
			d.writeHeaders(s.id, s.respTrailers, true)
		} else {
			_ = d.fr.WriteData(s.id, true, nil)
		}
		fs.add(&d.h2conn)
		s.respDone = true
		s.maybeDone(fs)
	}
}

// upCredit returns response window to the upstream for bytes passed on.
func (s *h2stream) upCredit(n int64, fs *flushSet) {
	u := s.u
	if u == nil || n <= 0 {
		return
	}
	u.mu.Lock()
	u.consumed(n, fs)
	s.upUnacked += n
	if !s.respEnd && s.upUnacked >= h2StreamWin/4 && !u.failed {
		_ = u.fr.WriteWindowUpdate(s.uid, uint32(s.upUnacked))
		s.upRecvWin += s.upUnacked
		s.upUnacked = 0
		fs.add(&u.h2conn)
	}
	u.mu.Unlock()
}

// maybeDone ends the stream once the response is complete; a request body
// still flowing is cut off with RST_STREAM(NO_ERROR) both ways, as a server
// that answered early does.
func (s *h2stream) maybeDone(fs *flushSet) {
	if s.closed || !s.respDone {
		return
	}
	if !s.reqEnded && !s.downReset {
		_ = s.d.fr.WriteRSTStream(s.id, http2.ErrCodeNo)
		fs.add(&s.d.h2conn)
		s.downReset = true
	}
	s.finish(fs)
}

// cancelUp resets the upstream stream of the current attempt (d.mu held).
func (s *h2stream) cancelUp(code http2.ErrCode, fs *flushSet) {
	u := s.u
	if u == nil {
		return
	}
	u.mu.Lock()
	if !u.failed && u.streams[s.uid] == s {
		_ = u.fr.WriteRSTStream(s.uid, code)
		fs.add(&u.h2conn)
	}
	u.release(s)
	u.mu.Unlock()
	s.u = nil
}

// resetBoth resets the stream both ways after the response started.
func (s *h2stream) resetBoth(code http2.ErrCode, fs *flushSet) {
	if !s.downReset && !s.respDone {
		_ = s.d.fr.WriteRSTStream(s.id, code)
		fs.add(&s.d.h2conn)
		s.downReset = true
	}
	s.cancelUp(http2.ErrCodeCancel, fs)
	s.finish(fs)
}

func (s *h2stream) stopPerTry() {
	if s.perTry != nil {
		s.perTry.Stop()
		s.perTry = nil
	}
}

// canRetry: the response has not started, the request sent so far can be
// replayed, attempts and budget remain.
func (s *h2stream) canRetry() bool {
	rp := s.st.retry
	return rp != nil && !s.respStarted && !s.noReplay && s.st.attempts <= rp.Attempts && !s.closed
}

// retry abandons the current attempt and schedules the next one; false
// when the retry budget refuses.
func (s *h2stream) retry(fs *flushSet) bool {
	if !s.st.route.Budget.Withdraw() {
		s.cl.Metrics().RetryBudgetExhausted.Inc()
		return false
	}
	s.cl.Metrics().Retries.Inc()
	s.endAttempt(http2.ErrCodeCancel, fs)
	s.waiting = true
	d := s.d
	time.AfterFunc(s.st.retry.Backoff(s.st.attempts-1), func() {
		fs := &flushSet{}
		d.mu.Lock()
		if !s.closed {
			s.dispatch(fs)
		}
		d.mu.Unlock()
		fs.flush()
	})
	return true
}

// redispatch moves a stream the upstream refused (REFUSED_STREAM, or above
// a GOAWAY's last stream) to another connection: the upstream did not
// process it, so this is not a retry.
func (s *h2stream) redispatch(fs *flushSet) bool {
	if s.respStarted || s.noReplay || s.st.attempts > 5 {
		return false
	}
	s.endAttempt(0, fs)
	s.dispatch(fs)
	return true
}

// endAttempt releases the current attempt (d.mu held); code 0 sends no
// RST_STREAM.
func (s *h2stream) endAttempt(code http2.ErrCode, fs *flushSet) {
	s.stopPerTry()
	if s.u != nil {
		if code != 0 {
			s.cancelUp(code, fs)
		} else {
			u := s.u
			u.mu.Lock()
			u.release(s)
			u.mu.Unlock()
			s.u = nil
		}
	}
	if s.ep != nil {
		s.ep.End()
		s.ep = nil
	}
	s.blockedUp = false
	s.reqSentEnd = false
}

// attemptFailed handles an upstream failure before or after the response
// started: retry, a local reply, or a reset downstream (d.mu held).
func (s *h2stream) attemptFailed(err error, code http2.ErrCode, fs *flushSet) {
	if s.closed {
		return
	}
	var ce *upstream.ConnectError
	o := upstream.OutcomeGateway
	if errors.As(err, &ce) {
		o = upstream.OutcomeConnect
	}
	if s.ep != nil {
		s.cl.Record(s.ep, o)
	}
	if s.respStarted {
		s.st.flags = addFlag(s.st.flags, "UPE")
		s.st.err = err
		s.resetBoth(code, fs)
		return
	}
	if s.canRetry() && s.st.retry.Retriable(nil, err) && s.retry(fs) {
		return
	}
	s.fail(err, fs)
}

// fail answers locally for a failed forward (errorHandler's mapping).
func (s *h2stream) fail(err error, fs *flushSet) {
	status, code, flag, msg := http.StatusBadGateway, 14, "UC", "upstream connection reset"
	var ce *upstream.ConnectError
	switch {
	case errors.Is(err, upstream.ErrOverflow):
		status, code, flag, msg = http.StatusServiceUnavailable, 14, "UO", err.Error()
	case errors.Is(err, upstream.ErrNoEndpoint):
		status, code, flag, msg = http.StatusServiceUnavailable, 14, "UH", err.Error()
	case errors.Is(err, errRouteTimeout), errors.Is(err, upstream.ErrPerTryTimeout), s.st.pastDeadline():
		status, code, flag, msg = http.StatusGatewayTimeout, 4, "UT", "upstream request timeout"
	case errors.As(err, &ce):
		status, code, flag, msg = http.StatusServiceUnavailable, 14, "UF", "upstream connect error"
	}
	s.st.flags = addFlag(s.st.flags, flag)
	s.st.err = err
	s.endAttempt(http2.ErrCodeCancel, fs)
	if s.respStarted {
		s.resetBoth(http2.ErrCodeInternal, fs)
		return
	}
	s.localReplyWith(status, code, msg, flag == "UO", fs)
}

func (s *h2stream) localReply(status, grpcCode int, msg string, fs *flushSet) {
	s.localReplyWith(status, grpcCode, msg, false, fs)
}

// localReply answers without an upstream: an HTTP status and text body, or
// a trailers-only gRPC status (HTTP 200, like Envoy) (d.mu held).
func (s *h2stream) localReplyWith(status, grpcCode int, msg string, overflow bool, fs *flushSet) {
	d := s.d
	s.respStarted = true
	var fields []hpack.HeaderField
	body := ""
	if s.st.grpc {
		s.status, s.grpcStatus = http.StatusOK, strconv.Itoa(grpcCode)
		fields = []hpack.HeaderField{{Name: ":status", Value: "200"}, {Name: "content-type", Value: "application/grpc"},
			{Name: "grpc-status", Value: s.grpcStatus}, {Name: "grpc-message", Value: msg}}
	} else {
		s.status = status
		body = msg + "\n"
		if s.exactBody {
			body = msg
		}
		fields = []hpack.HeaderField{{Name: ":status", Value: strconv.Itoa(status)},
			{Name: "content-type", Value: "text/plain; charset=utf-8"}, {Name: "x-content-type-options", Value: "nosniff"},
			{Name: "content-length", Value: strconv.Itoa(len(body))}}
	}
	if overflow {
		fields = append(fields, hpack.HeaderField{Name: "x-meshlet-overflow", Value: "true"})
	}
	if !s.downReset {
		d.writeHeaders(s.id, fields, body == "")
		if body != "" {
			_ = d.fr.WriteData(s.id, true, []byte(body))
			s.bytes += int64(len(body))
		}
		fs.add(&d.h2conn)
	}
	s.respDone, s.respEnd = true, true
	s.maybeDone(fs)
}

func (s *h2stream) onTimeout() {
	fs := &flushSet{}
	s.d.mu.Lock()
	if !s.closed {
		if s.respStarted {
			s.st.flags = addFlag(s.st.flags, "UT")
			s.resetBoth(http2.ErrCodeCancel, fs)
		} else {
			s.fail(errRouteTimeout, fs)
		}
	}
	s.d.mu.Unlock()
	fs.flush()
}

func (s *h2stream) onPerTry() {
	fs := &flushSet{}
	s.d.mu.Lock()
	if !s.closed && !s.respStarted && s.perTry != nil {
		s.perTry = nil
		if !s.canRetry() || !s.retry(fs) { // else the next attempt is scheduled
			s.fail(upstream.ErrPerTryTimeout, fs)
		}
	}
	s.d.mu.Unlock()
	fs.flush()
}

// finish removes the stream and records it (d.mu held).
func (s *h2stream) finish(fs *flushSet) {
	if s.closed {
		return
	}
	s.closed = true
	d := s.d
	delete(d.streams, s.id)
	if s.blockedDown {
		d.blocked = withoutStream(d.blocked, s)
	}
	// The upstream stream is closed both ways after a complete exchange;
	// anything else is cancelled there.
	code := http2.ErrCodeCancel
	if s.reqSentEnd && s.respEnd {
		code = 0
	}
	s.endAttempt(code, fs)
	if s.timer != nil {
		s.timer.Stop()
	}
	if s.counted {
		s.cl.Release()
	}
	now := time.Now()
	d.lastUse = now
	if s.respDone {
		d.done++ // completed, not cancelled: the rapid-reset ratio's other side
	}
	p := d.p
	status := s.status
	if status == 0 || !s.respDone && strings.Contains(s.st.flags, "DC") {
		status = 499
	}
	dur := now.Sub(s.start)
	if s.st.route != nil {
		if rm := s.st.route.Metrics[s.st.metricsCluster()]; rm != nil {
			rm.Observe(status, dur)
		}
	} else if strings.Contains(s.st.flags, "NR") {
		p.m.noRoute.Inc()
	}
	if s.req != nil {
		var gs string
		if s.st.grpc {
			gs = s.grpcStatus
		}
		s.st.tab.alog.log(s.req, &s.st, d.dir, status, gs, s.bytes, dur, s.start)
	}
	s.reqQ, s.respQ, s.replay = nil, nil, nil
	if (d.goaway || d.peerGA) && len(d.streams) == 0 {
		d.closeSoon()
	}
}
