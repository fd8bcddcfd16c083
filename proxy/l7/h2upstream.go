package l7

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"sync"
	"time"

	"golang.org/x/net/http2"

	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
	"github.com/meshlet/meshlet/proxy/sniff"
)

// h2poolKey names the upstream connections of one endpoint of a cluster.
type h2poolKey struct {
	cl   *upstream.Cluster
	addr string
}

// h2pool holds the HTTP/2 connections to one endpoint. A stream goes on the
// first connection with room under the server's MAX_CONCURRENT_STREAMS; when
// none has room one more is dialed (one dial at a time; streams wait for it).
type h2pool struct {
	p       *Engine
	key     h2poolKey
	dir     l4.Direction
	mu      sync.Mutex
	conns   []*h2up
	dialing bool
	gone    bool // removed from the proxy's map
	waiters []h2waiter
}

type h2waiter struct {
	s       *h2stream
	attempt int
}

func (p *Engine) h2pool(cl *upstream.Cluster, addr string, dir l4.Direction) *h2pool {
	key := h2poolKey{cl, addr}
	if v, ok := p.h2.pools.Load(key); ok {
		return v.(*h2pool)
	}
	v, _ := p.h2.pools.LoadOrStore(key, &h2pool{p: p, key: key, dir: dir})
	return v.(*h2pool)
}

// acquire puts s on a connection with room, or queues it for a new one
// (s.d.mu held).
func (pl *h2pool) acquire(s *h2stream, fs *flushSet) {
	pl.mu.Lock()
	defer pl.mu.Unlock()
	if pl.gone { // left the map while empty: back in, or use the one that replaced it
		if v, loaded := pl.p.h2.pools.LoadOrStore(pl.key, pl); loaded && v != pl {
			pl.mu.Unlock()
			v.(*h2pool).acquire(s, fs)
			pl.mu.Lock()
			return
		}
		pl.gone = false
	}
	for _, u := range pl.conns {
		u.mu.Lock()
		if !u.goaway && !u.failed && uint32(len(u.streams)) < u.maxStreams {
			s.attach(u, fs)
			u.mu.Unlock()
			return
		}
		u.mu.Unlock()
	}
	s.waiting = true
	pl.waiters = append(pl.waiters, h2waiter{s, s.st.attempts})
	if !pl.dialing {
		pl.dialing = true
		go pl.dial()
	}
}

// dial connects one more upstream connection and hands it the waiting
// streams (or the connect failure).
func (pl *h2pool) dial() {
	cl := pl.key.cl
	timeout := orDur(cl.Config().Pool.ConnectTimeout.D, 10*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	nc, err := pl.p.dialUpstream(ctx, pl.dir, "tcp", pl.key.addr)
	var u *h2up
	if err != nil {
		if cl.Metrics() != nil {
			cl.Metrics().ConnectFailures.Inc()
		}
		err = &upstream.ConnectError{Err: err}
	} else if mt := cl.Mesh(); mt != nil && mt.Uses(pl.key.addr) {
		nc, err = mt.HandshakeH2(ctx, nc, pl.key.addr)
	}
	cancel()
	if err == nil {
		u = newH2up(pl, nc)
	}
	pl.mu.Lock()
	ws := pl.waiters
	pl.waiters = nil
	pl.dialing = false
	if u != nil {
		pl.conns = append(pl.conns, u)
	}
	pl.mu.Unlock()
	if u != nil {
		go u.writeLoop(u.resume)
		go u.readLoop()
	}
	for _, w := range ws {
		s := w.s
		fs := &flushSet{}
		s.d.mu.Lock()
		if !s.closed && s.waiting && s.u == nil && s.st.attempts == w.attempt {
			if err != nil {
				s.waiting = false
				s.attemptFailed(err, http2.ErrCodeRefusedStream, fs)
			} else {
				pl.acquire(s, fs)
			}
		}
		s.d.mu.Unlock()
		fs.flush()
	}
}

// remove drops a connection that takes no new streams. An empty pool leaves
// the proxy's map, so original-destination pools (one per address) do not
// pile up; a stream that still holds it puts it back (acquire).
func (pl *h2pool) remove(u *h2up) {
	pl.mu.Lock()
	for i, c := range pl.conns {
		if c == u {
			pl.conns = append(pl.conns[:i], pl.conns[i+1:]...)
			break
		}
	}
	if len(pl.conns) == 0 && !pl.dialing && len(pl.waiters) == 0 {
		pl.gone = pl.p.h2.pools.CompareAndDelete(pl.key, pl)
	}
	pl.mu.Unlock()
}

// h2up is an upstream (server) connection. Its mu guards the connection and
// its stream map; the streams' own state is guarded by their downstream
// connection's mu, taken first.
type h2up struct {
	h2conn
	pool       *h2pool
	streams    map[uint32]*h2stream
	nextID     uint32
	maxStreams uint32
	goaway     bool // no new streams (GOAWAY either way, idle, close)
	lastUse    time.Time
	idle       *time.Timer
}

func newH2up(pl *h2pool, nc net.Conn) *h2up {
	u := &h2up{pool: pl, streams: map[uint32]*h2stream{}, nextID: 1, maxStreams: h2DefStreams, lastUse: time.Now()}
	u.init(nc, 1<<20)
	u.out.b = append(u.out.b, sniff.Preface...)
	_ = u.fr.WriteSettings(
		http2.Setting{ID: http2.SettingEnablePush, Val: 0},
		http2.Setting{ID: http2.SettingInitialWindowSize, Val: h2StreamWin},
		http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: 1 << 20},
	)
	_ = u.fr.WriteWindowUpdate(0, h2ConnWin-h2InitWin)
	u.recvWin = h2ConnWin
	u.kick()
	idle := orDur(pl.key.cl.Config().Pool.IdleTimeout.D, 90*time.Second)
	u.idle = time.AfterFunc(idle, func() { u.onIdle(idle) })
	return u
}

// lookup returns the stream with upstream id (nil if gone).
func (u *h2up) lookup(id uint32) *h2stream {
	u.mu.Lock()
	s := u.streams[id]
	u.mu.Unlock()
	return s
}

// current reports whether s still belongs to this connection's stream id
// (s.d.mu held): retries move streams between connections.
func (u *h2up) current(s *h2stream, id uint32) bool {
	return !s.closed && s.u == u && s.uid == id
}

// detachEach releases every stream of ss still attached to u and calls
// then for it, each under its downstream connection's lock (u.mu not held).
func (u *h2up) detachEach(ss []*h2stream, then func(*h2stream)) {
	for _, s := range ss {
		id := s.uid
		s.d.mu.Lock()
		if u.current(s, id) {
			u.mu.Lock()
			u.release(s)
			u.mu.Unlock()
			then(s)
		}
		s.d.mu.Unlock()
	}
}

// withoutStream removes s from a blocked list (order kept).
func withoutStream(list []*h2stream, s *h2stream) []*h2stream {
	if i := slices.Index(list, s); i >= 0 {
		return slices.Delete(list, i, i+1)
	}
	return list
}

// release removes s from the connection (u.mu held); idempotent.
func (u *h2up) release(s *h2stream) {
	if u.streams[s.uid] != s {
		return
	}
	delete(u.streams, s.uid)
	if s.blockedUp {
		u.blocked = withoutStream(u.blocked, s)
		s.blockedUp = false
	}
	if len(u.streams) == 0 {
		u.lastUse = time.Now()
		if u.goaway && !u.failed {
			go u.close(http2.ErrCodeNo)
		}
	}
}

func (u *h2up) readLoop() {
	fs := &flushSet{}
	var err error
	for {
		var f http2.Frame
		f, err = u.fr.ReadFrame()
		if err != nil {
			var se http2.StreamError
			if errors.As(err, &se) {
				u.streamError(se.StreamID, se.Code, fmt.Errorf("upstream sent a malformed frame: %w", err), fs)
				fs.flush()
				continue
			}
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				u.mu.Lock()
				_ = u.fr.WriteGoAway(0, http2.ErrCode(ce), nil)
				u.mu.Unlock()
				u.flush()
			}
			break
		}
		if err = u.onFrame(f, fs); err != nil {
			var ce http2.ConnectionError
			if errors.As(err, &ce) {
				u.mu.Lock()
				_ = u.fr.WriteGoAway(0, http2.ErrCode(ce), nil)
				u.mu.Unlock()
				fs.flush()
				u.flush()
			}
			break
		}
		if u.br.Buffered() == 0 {
			fs.flush()
		}
		if u.backlogged(u.pool.p.h2.outMax.Load()) {
			err = errors.New("upstream does not read")
			break
		}
	}
	fs.flush()
	u.teardown(fmt.Errorf("upstream connection lost: %w", err))
}

// streamError resets upstream stream id and fails its request.
func (u *h2up) streamError(id uint32, code http2.ErrCode, err error, fs *flushSet) {
	u.mu.Lock()
	_ = u.fr.WriteRSTStream(id, code)
	fs.add(&u.h2conn)
	s := u.streams[id]
	if s != nil {
		u.release(s)
	}
	u.mu.Unlock()
	if s != nil {
		s.d.mu.Lock()
		if !s.closed && s.u == u && s.uid == id {
			s.attemptFailed(err, http2.ErrCodeInternal, fs)
		}
		s.d.mu.Unlock()
	}
}

// onFrame handles one frame from the upstream; an error ends the connection.
func (u *h2up) onFrame(f http2.Frame, fs *flushSet) error {
	switch f := f.(type) {
	case *http2.MetaHeadersFrame:
		id := f.StreamID
		s := u.lookup(id)
		if s == nil {
			return nil
		}
		s.d.mu.Lock()
		if u.current(s, id) {
			if f.Truncated {
				s.attemptFailed(errors.New("upstream response headers too large"), http2.ErrCodeInternal, fs)
			} else {
				s.respHeaders(f.Fields, f.StreamEnded(), fs)
			}
		}
		s.d.mu.Unlock()
	case *http2.DataFrame:
		id := f.StreamID
		n := int64(f.Length)
		u.mu.Lock()
		if n > u.recvWin {
			u.mu.Unlock()
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		u.recvWin -= n
		s := u.streams[id]
		if s == nil {
			u.consumed(n, fs)
			u.mu.Unlock()
			return nil
		}
		u.mu.Unlock()
		s.d.mu.Lock()
		switch {
		case !u.current(s, id):
			u.mu.Lock()
			u.consumed(n, fs)
			u.mu.Unlock()
		case n > s.upRecvWin:
			s.d.mu.Unlock()
			u.mu.Lock()
			u.consumed(n, fs)
			u.mu.Unlock()
			u.streamError(id, http2.ErrCodeFlowControl, errors.New("upstream exceeded its flow-control window"), fs)
			return nil
		case !s.respStarted:
			u.mu.Lock()
			u.consumed(n, fs)
			u.mu.Unlock()
			s.attemptFailed(errors.New("upstream sent DATA before response headers"), http2.ErrCodeProtocol, fs)
		default:
			s.upRecvWin -= n
			data := f.Data()
			if pad := n - int64(len(data)); pad > 0 {
				s.upCredit(pad, fs)
			}
			s.forwardResp(data, f.StreamEnded(), fs)
		}
		s.d.mu.Unlock()
	case *http2.RSTStreamFrame:
		id := f.StreamID
		u.mu.Lock()
		s := u.streams[id]
		if s != nil {
			u.release(s)
		}
		u.mu.Unlock()
		if s == nil {
			return nil
		}
		s.d.mu.Lock()
		if u.current(s, id) {
			switch {
			case s.respEnd:
				// The upstream ended its side after a complete response;
				// what is still queued for the client goes on.
				s.u = nil
				s.reqSentEnd = true
				s.maybeDone(fs)
			case f.ErrCode == http2.ErrCodeRefusedStream && s.redispatch(fs):
			default:
				s.attemptFailed(fmt.Errorf("upstream reset the stream: %v", f.ErrCode), f.ErrCode, fs)
			}
		}
		s.d.mu.Unlock()
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
		}
		var delta int64
		var err error
		u.mu.Lock()
		_ = f.ForeachSetting(func(st http2.Setting) error {
			if verr := st.Valid(); verr != nil {
				err = http2.ConnectionError(http2.ErrCodeProtocol)
				return verr
			}
			switch st.ID {
			case http2.SettingInitialWindowSize:
				delta += int64(st.Val) - u.peerInitWin
				u.peerInitWin = int64(st.Val)
			case http2.SettingMaxFrameSize:
				u.peerMaxFrame = st.Val
			case http2.SettingHeaderTableSize:
				u.enc.SetMaxDynamicTableSizeLimit(st.Val)
			case http2.SettingMaxConcurrentStreams:
				u.maxStreams = st.Val
			}
			return nil
		})
		if err != nil {
			u.mu.Unlock()
			return err
		}
		_ = u.fr.WriteSettingsAck()
		fs.add(&u.h2conn)
		var all []*h2stream
		if delta != 0 {
			for _, s := range u.streams {
				all = append(all, s)
			}
		}
		u.mu.Unlock()
		for _, s := range all {
			s.d.mu.Lock()
			if s.u == u && !s.closed {
				s.upWin += delta
				if delta > 0 {
					s.pushReq(fs)
				}
			}
			s.d.mu.Unlock()
		}
	case *http2.PingFrame:
		if !f.IsAck() {
			u.mu.Lock()
			_ = u.fr.WritePing(true, f.Data)
			fs.add(&u.h2conn)
			u.mu.Unlock()
		}
	case *http2.WindowUpdateFrame:
		if f.StreamID == 0 {
			u.mu.Lock()
			u.sendWin += int64(f.Increment)
			bl := u.takeBlocked()
			u.mu.Unlock()
			u.resumeStreams(bl, fs)
			return nil
		}
		s := u.lookup(f.StreamID)
		if s == nil {
			return nil
		}
		s.d.mu.Lock()
		if u.current(s, f.StreamID) {
			s.upWin += int64(f.Increment)
			s.pushReq(fs)
		}
		s.d.mu.Unlock()
	case *http2.GoAwayFrame:
		u.pool.remove(u)
		u.mu.Lock()
		u.goaway = true
		var refused []*h2stream
		for id, s := range u.streams {
			if id > f.LastStreamID {
				refused = append(refused, s)
			}
		}
		idle := len(u.streams) == 0
		u.mu.Unlock()
		u.detachEach(refused, func(s *h2stream) {
			if !s.redispatch(fs) {
				s.attemptFailed(errors.New("upstream refused the stream (GOAWAY)"), http2.ErrCodeRefusedStream, fs)
			}
		})
		if idle {
			go u.close(http2.ErrCodeNo)
		}
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol)
	}
	return nil
}

// resume pushes request data of streams that waited for buffer room.
func (u *h2up) resume() {
	fs := &flushSet{}
	u.mu.Lock()
	bl := u.takeBlocked()
	u.mu.Unlock()
	u.resumeStreams(bl, fs)
	fs.flush()
}

func (u *h2up) resumeStreams(bl []*h2stream, fs *flushSet) {
	for _, s := range bl {
		s.d.mu.Lock()
		if s.u == u && !s.closed {
			s.blockedUp = false
			s.pushReq(fs)
		}
		s.d.mu.Unlock()
	}
}

func (u *h2up) onIdle(d time.Duration) {
	u.mu.Lock()
	idle := len(u.streams) == 0 && time.Since(u.lastUse) >= d
	dead := u.failed || u.goaway
	u.mu.Unlock()
	switch {
	case dead:
	case idle:
		u.close(http2.ErrCodeNo)
	default:
		u.idle.Reset(d)
	}
}

// close ends the connection with GOAWAY; streams still on it fail.
func (u *h2up) close(code http2.ErrCode) {
	u.pool.remove(u)
	u.mu.Lock()
	u.goaway = true
	if !u.failed {
		_ = u.fr.WriteGoAway(0, code, nil)
	}
	u.mu.Unlock()
	u.flush()
	u.nc.Close() // the reader tears down
}

// teardown fails the streams of a lost connection.
func (u *h2up) teardown(err error) {
	u.pool.remove(u)
	u.idle.Stop()
	u.stop()
	u.nc.Close()
	u.mu.Lock()
	u.failed = true
	u.goaway = true
	var all []*h2stream
	for _, s := range u.streams {
		all = append(all, s)
	}
	u.mu.Unlock()
	fs := &flushSet{}
	u.detachEach(all, func(s *h2stream) { s.attemptFailed(err, http2.ErrCodeInternal, fs) })
	fs.flush()
}

// drainH2 sends GOAWAY on the direction's frame-forwarded connections.
func (p *Engine) drainH2(dir l4.Direction) {
	p.h2.conns.Range(func(k, _ any) bool {
		if d := k.(*h2down); d.dir == dir {
			d.goAway(http2.ErrCodeNo)
		}
		return true
	})
}

// closeH2 closes every frame-forwarded connection at once.
func (p *Engine) closeH2() {
	p.h2.conns.Range(func(k, _ any) bool { k.(*h2down).nc.Close(); return true })
	p.h2.pools.Range(func(_, v any) bool {
		pl := v.(*h2pool)
		pl.mu.Lock()
		conns := append([]*h2up(nil), pl.conns...)
		pl.mu.Unlock()
		for _, u := range conns {
			u.close(http2.ErrCodeNo)
		}
		return true
	})
}
