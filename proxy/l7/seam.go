package l7

import (
	"context"
	"crypto/tls"
	"net"
	"net/netip"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/sniff"
)

// Chooser returns the generation server's handler chooser (package l4's
// seam): connections to ports declared tcp go straight to the L4 forwarder
// (nil), every other port to the engine, which sniffs undeclared ports and
// hands opaque TCP back to fwd with the bytes it already read.
//
// Unless Options.Dial was given, upstream connections are then dialled like
// fwd dials (ForwarderDial). Call Chooser before serving.
func (p *Engine) Chooser(fwd *l4.Forwarder) l4.Chooser {
	if fwd != nil && !p.dialFromOpt {
		d := ForwarderDial(fwd)
		p.dial.Store(&d)
	}
	h := &seamHandler{p: p, fwd: fwd}
	mh := &meshInbound{h}
	return func(c *l4.Conn) l4.Handler {
		if c.Direction == l4.Inbound {
			m := p.tab.Load().peerAuth.ModeFor(c.OrigDst.Port())
			switch {
			case c.ResumedHTTP1 && m == config.PeerStrict:
				// Plain text moved from a generation that still took it.
				return deniedConn{}
			case !c.ResumedHTTP1 && (m == config.PeerStrict || m == config.PeerPermissive):
				// Authorized once the TLS state (or its absence) is known.
				return mh
			}
			if !p.admitConn(c) {
				return deniedConn{}
			}
		}
		if p.Protocol(c.OrigDst.Port()) == config.ProtoTCP {
			return nil
		}
		return h
	}
}

// ForwarderDial dials upstreams the way fwd does: inbound connections to the
// application from its passthrough source address (127.0.0.6 / ::6, so the
// capture rules let them through), with its connect timeouts.
func ForwarderDial(fwd *l4.Forwarder) DialFunc {
	return func(ctx context.Context, dir l4.Direction, network, addr string) (net.Conn, error) {
		o := fwd.Options[dir]
		d := net.Dialer{Timeout: o.ConnectTimeout, KeepAlive: 30 * time.Second}
		if d.Timeout == 0 {
			d.Timeout = 10 * time.Second
		}
		if dir == l4.Inbound {
			if ap, err := netip.ParseAddrPort(addr); err == nil {
				src := o.SourceIPv4
				if ap.Addr().Is6() && !ap.Addr().Is4In6() {
					src = o.SourceIPv6
				}
				if src.IsValid() {
					d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
				}
			}
		}
		return d.DialContext(ctx, network, addr)
	}
}

// admitConn decides an inbound connection by the current table's
// connection rules (the RBAC network filters of its destination port's
// chain) before a byte is read from it or sent to the application.
func (p *Engine) admitConn(c *l4.Conn) bool { return p.admitConnTLS(c, nil) }

// admitConnTLS is admitConn for a connection whose TLS state is cs (nil:
// plain text).
func (p *Engine) admitConnTLS(c *l4.Conn, cs *tls.ConnectionState) bool {
	t := p.tab.Load()
	if t == nil || t.authorizeConn == nil {
		return true
	}
	src, _ := netip.ParseAddrPort(c.Client.RemoteAddr().String())
	ok, policy := t.authorizeConn(src, c.OrigDst, cs)
	if !ok {
		p.m.rbacDenied.WithLabelValues(policy).Inc()
		p.log.Info("inbound connection denied", "flags", "RBAC", "policy", policy, "source", src.String(), "destination", c.OrigDst.String())
	}
	return ok
}

// deniedConn closes a connection authorization denied.
type deniedConn struct{}

// ServeConn implements l4.Handler.
func (deniedConn) ServeConn(_ context.Context, c *l4.Conn) { _ = c.Client.Close() }

type seamHandler struct {
	p   *Engine
	fwd *l4.Forwarder
}

// ServeConn implements l4.Handler.
func (h *seamHandler) ServeConn(ctx context.Context, c *l4.Conn) {
	h.serve(ctx, c, c.Client, true)
}

// serve serves c, whose bytes are read from conn: c.Client itself or a
// connection over it (a replay of peeked bytes, or inbound TLS). raw says
// that conn's bytes are c.Client's, so opaque TCP can go to the L4
// forwarder with the bytes read so far.
func (h *seamHandler) serve(ctx context.Context, c *l4.Conn, conn net.Conn, raw bool) {
	dir := c.Direction
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-c.Draining():
			h.p.StartDrain(dir)
		case <-stop:
		}
	}()
	mv := &h1Mover{lc: c}
	if h.fwd != nil {
		mv.m = h.fwd.Metrics[dir]
	}
	if c.ResumedHTTP1 {
		// Handed over by the previous generation between two requests.
		if len(c.Carried) > 0 {
			conn = sniff.NewConn(conn, c.Carried)
		}
		h.p.serveHTTP(ctx, conn, c.OrigDst, dir, mv)
		return
	}
	proto := h.p.Protocol(c.OrigDst.Port())
	if proto == config.ProtoTCP {
		h.tcp(ctx, c, conn, raw)
		return
	}
	var det *sniff.Result
	if proto == config.ProtoAuto {
		res, sc := h.p.detector.Detect(conn)
		if res.Protocol == sniff.TCP {
			h.tcp(ctx, c, sc, raw)
			return
		}
		conn, det = sc, &res
	}
	if conn, done := h.p.serveMaybeH2(ctx, conn, det, c.OrigDst, dir); !done {
		h.p.serveHTTP(ctx, conn, c.OrigDst, dir, mv)
	}
}

// tcp relays opaque TCP read from conn: through the L4 forwarder (with the
// bytes conn has replayed) when conn's bytes are the socket's, else by the
// engine's copy (inbound TLS).
func (h *seamHandler) tcp(ctx context.Context, c *l4.Conn, conn net.Conn, raw bool) {
	if raw && h.fwd != nil {
		var prefix []byte
		if sc, ok := conn.(*sniff.Conn); ok {
			prefix = sc.Buffered()
		}
		_ = h.fwd.Forward(ctx, c, prefix)
		return
	}
	h.p.serveTCP(ctx, conn, c.OrigDst, c.Direction)
}

// meshInbound serves inbound connections on ports whose PeerAuthentication
// is STRICT or PERMISSIVE: mutual TLS is terminated first (STRICT refuses
// plain text; PERMISSIVE serves it as is), then the connection is
// authorized with its TLS state and served like any other.
type meshInbound struct{ h *seamHandler }

// ServeConn implements l4.Handler.
func (m *meshInbound) ServeConn(ctx context.Context, c *l4.Conn) {
	p := m.h.p
	mode := p.tab.Load().peerAuth.ModeFor(c.OrigDst.Port())
	if c.ResumedHTTP1 {
		// Moved here by the previous generation between two requests: plain
		// text (a TLS connection cannot move), whose next request may be in
		// c.Carried already, so nothing is read before serving it.
		if mode == config.PeerStrict || !p.admitConnTLS(c, nil) {
			_ = c.Client.Close()
			return
		}
		m.h.serve(ctx, c, c.Client, true)
		return
	}
	conn, cs, err := p.inbound.Accept(ctx, c.Client, mode)
	if err != nil {
		p.log.Debug("inbound connection refused", "mode", mode, "source", c.Client.RemoteAddr().String(), "destination", c.OrigDst.String(), "err", err)
		_ = c.Client.Close()
		return
	}
	if !p.admitConnTLS(c, cs) {
		_ = conn.Close()
		return
	}
	m.h.serve(ctx, c, conn, cs == nil)
}
