package l7

import (
	"context"
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
	return func(c *l4.Conn) l4.Handler {
		if c.Direction == l4.Inbound && !p.admitConn(c) {
			return deniedConn{}
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
func (p *Engine) admitConn(c *l4.Conn) bool {
	t := p.tab.Load()
	if t == nil || t.authorizeConn == nil {
		return true
	}
	src, _ := netip.ParseAddrPort(c.Client.RemoteAddr().String())
	ok, policy := t.authorizeConn(src, c.OrigDst, nil) // no inbound TLS yet
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
	var conn net.Conn = c.Client
	var det *sniff.Result
	if h.p.Protocol(c.OrigDst.Port()) == config.ProtoAuto {
		res, sc := h.p.detector.Detect(c.Client)
		if res.Protocol == sniff.TCP {
			if h.fwd != nil {
				_ = h.fwd.Forward(ctx, c, sc.Buffered())
				return
			}
			h.p.serveTCP(ctx, sc, c.OrigDst, dir)
			return
		}
		conn, det = sc, &res
	}
	if conn, done := h.p.serveMaybeH2(ctx, conn, det, c.OrigDst, dir); !done {
		h.p.serveHTTP(ctx, conn, c.OrigDst, dir)
	}
}
