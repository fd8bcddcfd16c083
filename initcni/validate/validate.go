// Package validate proves, without privileges, that traffic capture works in
// the current network namespace. It is what the unprivileged
// `istio-validation` init container runs in CNI mode (`meshlet init
// --validate`).
//
// The testable path for the proxy's own UID/GID (1337): the capture rules
// send a TCP connection from the proxy UID over lo to a non-127.0.0.1
// address through ISTIO_IN_REDIRECT to the inbound capture port. So the
// probe listens on the inbound capture port (15006) and the outbound proxy
// port (15001), dials 127.0.0.6:15002 (the validation probe port, where
// nothing listens), and requires that the connection is accepted on the
// inbound capture port with original destination 127.0.0.6:15002. Without
// capture the dial is refused. Run as any other UID the loopback rules leave
// the connection alone by design, so the probe refuses to run then.
//
// IPv6: ::6 is the passthrough source and exempt, so when the namespace has a
// global IPv6 address (and IPv6 is not off) the probe also dials that
// address on port 15002 over lo and expects the same redirect.
package validate

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"time"

	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/proxy/origdst"
)

// ErrCaptureNotWorking is returned when the probe connection is not
// redirected as the rules promise.
var ErrCaptureNotWorking = errors.New("traffic capture is not working")

// ErrWrongIdentity is returned when the probe does not run as the proxy UID
// or GID, the only identity whose loopback traffic the rules redirect.
var ErrWrongIdentity = errors.New("validation must run as the proxy UID or GID")

// Options tune the probe. Zero values mean defaults.
type Options struct {
	// ProbeAddr is the IPv4 address dialled (default 127.0.0.6:15002).
	ProbeAddr netip.AddrPort
	// ProbeAddr6 is the IPv6 address dialled when the config has IPv6 rules
	// (default: the namespace's first global IPv6 address, port 15002; none
	// means IPv6 is not probed).
	ProbeAddr6 netip.AddrPort
	// Timeout bounds each probe (default 10s); the dial is retried until
	// then so rules installed a moment later still count.
	Timeout time.Duration
	// UID and GID are the identity to check against the config (default
	// the process's own).
	UID, GID int
}

// Result is what the probe saw.
type Result struct {
	ListenPort   uint16         // port the redirected IPv4 probe arrived on
	OriginalDest netip.AddrPort // its SO_ORIGINAL_DST
	// OriginalDest6 is the IPv6 probe's original destination, when probed.
	OriginalDest6 netip.AddrPort
	Attempts      int
}

type accepted struct {
	port uint16
	conn *net.TCPConn
}

// Run validates capture for c in the current network namespace.
func Run(ctx context.Context, c capture.Config, o Options) (Result, error) {
	if !o.ProbeAddr.IsValid() {
		o.ProbeAddr = netip.AddrPortFrom(netip.MustParseAddr("127.0.0.6"), capture.ValidationPort)
	}
	if !o.ProbeAddr6.IsValid() && c.IPv6 != capture.IPv6Off {
		if a, ok := capture.GlobalIPv6(); ok {
			o.ProbeAddr6 = netip.AddrPortFrom(a, capture.ValidationPort)
		}
	}
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Second
	}
	if o.UID == 0 && o.GID == 0 {
		o.UID, o.GID = os.Getuid(), os.Getgid()
	}
	if !slices.Contains(c.ProxyUIDs, uint32(o.UID)) && !slices.Contains(c.ProxyGIDs, uint32(o.GID)) {
		return Result{}, fmt.Errorf("%w: running as uid %d gid %d, proxy UIDs %v GIDs %v", ErrWrongIdentity, o.UID, o.GID, c.ProxyUIDs, c.ProxyGIDs)
	}

	got := make(chan accepted, 4)
	var lns []net.Listener
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	for _, p := range []uint16{c.InboundCapturePort, c.ProxyPort} {
		// "tcp" on the wildcard is dual stack where IPv6 exists.
		l, err := net.Listen("tcp", net.JoinHostPort("", strconv.Itoa(int(p))))
		if err != nil {
			return Result{}, fmt.Errorf("listening on capture port %d: %w", p, err)
		}
		lns = append(lns, l)
		go func() {
			for {
				conn, err := l.Accept()
				if err != nil {
					return
				}
				got <- accepted{p, conn.(*net.TCPConn)}
			}
		}()
	}

	var res Result
	var err error
	res.ListenPort, res.OriginalDest, err = probe(ctx, c, o.ProbeAddr, o.Timeout, got, &res.Attempts)
	if err != nil {
		return res, err
	}
	if o.ProbeAddr6.IsValid() {
		_, res.OriginalDest6, err = probe(ctx, c, o.ProbeAddr6, o.Timeout, got, &res.Attempts)
	}
	return res, err
}

// probe dials addr until it is redirected to the inbound capture port with
// addr as original destination, or the timeout passes.
func probe(ctx context.Context, c capture.Config, addr netip.AddrPort, timeout time.Duration, got <-chan accepted, attempts *int) (uint16, netip.AddrPort, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var lastErr error
	d := net.Dialer{Timeout: time.Second}
	for ctx.Err() == nil {
		*attempts++
		conn, err := d.DialContext(ctx, "tcp", addr.String())
		if err != nil {
			lastErr = err
			select {
			case <-ctx.Done():
			case <-time.After(200 * time.Millisecond):
			}
			continue
		}
		local := conn.LocalAddr().String()
		var a accepted
		select {
		case a = <-got:
		case <-ctx.Done():
			conn.Close()
			return 0, netip.AddrPort{}, fmt.Errorf("%w: dial %s succeeded but no capture port accepted it (something listens on the probe port?)", ErrCaptureNotWorking, addr)
		}
		conn.Close()
		if a.conn.RemoteAddr().String() != local {
			a.conn.Close()
			continue // a stray connection; try again
		}
		od, err := origdst.Get(a.conn)
		a.conn.Close()
		if err != nil {
			return a.port, od, fmt.Errorf("%w: probe to %s arrived on port %d but has no original destination: %w", ErrCaptureNotWorking, addr, a.port, err)
		}
		od = netip.AddrPortFrom(od.Addr().Unmap(), od.Port())
		if a.port != c.InboundCapturePort {
			return a.port, od, fmt.Errorf("%w: probe to %s arrived on port %d, want inbound capture port %d", ErrCaptureNotWorking, addr, a.port, c.InboundCapturePort)
		}
		if od != addr {
			return a.port, od, fmt.Errorf("%w: probe to %s has original destination %s", ErrCaptureNotWorking, addr, od)
		}
		return a.port, od, nil
	}
	return 0, netip.AddrPort{}, fmt.Errorf("%w: probe to %s was not redirected to port %d within %s (%d attempts so far): %v", ErrCaptureNotWorking, addr, c.InboundCapturePort, timeout, *attempts, lastErr) //nolint:errorlint // lastErr may be nil (probes connected, none redirected): shown, not wrapped
}
