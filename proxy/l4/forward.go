package l4

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshlet/meshlet/proxy/stats"
)

// DirectionOptions are the L4 settings of one direction.
type DirectionOptions struct {
	// ConnectTimeout bounds the dial to the original destination; 0: 10s.
	ConnectTimeout time.Duration
	// IdleTimeout closes a connection quiet in both directions this long;
	// 0 disables it.
	IdleTimeout time.Duration
	// SourceIPv4 and SourceIPv6, when valid, are bound as the source of the
	// upstream connection (inbound: 127.0.0.6 and ::6).
	SourceIPv4, SourceIPv6 netip.Addr
}

// Metrics are the counters of one direction.
type Metrics struct {
	Connections   *stats.Counter
	BytesReceived *stats.Counter // from the downstream client
	BytesSent     *stats.Counter // to the downstream client
	ConnectErrors *stats.Counter
	IdleTimeouts  *stats.Counter
	// DrainCloses counts connections closed at the drain deadline.
	DrainCloses *stats.Counter
	Resets      *stats.Counter
	// HandedOver counts connections moved to the next generation;
	// HandoverFailures those a failed send kept here; Adopted those taken
	// from the previous generation.
	HandedOver, HandoverFailures, Adopted *stats.Counter
	Active                                atomic.Int64 // this generation only
}

// NewMetrics registers the counters of direction d in r.
func NewMetrics(r *stats.Region, d Direction) *Metrics {
	l := fmt.Sprintf("{direction=%q}", d)
	return &Metrics{
		Connections:      r.Counter("meshlet_proxy_connections_total" + l),
		BytesReceived:    r.Counter("meshlet_proxy_received_bytes_total" + l),
		BytesSent:        r.Counter("meshlet_proxy_sent_bytes_total" + l),
		ConnectErrors:    r.Counter(fmt.Sprintf("meshlet_proxy_errors_total{direction=%q,kind=\"connect\"}", d)),
		IdleTimeouts:     r.Counter(fmt.Sprintf("meshlet_proxy_errors_total{direction=%q,kind=\"idle_timeout\"}", d)),
		Resets:           r.Counter(fmt.Sprintf("meshlet_proxy_errors_total{direction=%q,kind=\"reset\"}", d)),
		DrainCloses:      r.Counter("meshlet_proxy_drain_closed_connections_total" + l),
		HandedOver:       r.Counter("meshlet_proxy_handed_over_connections_total" + l),
		Adopted:          r.Counter("meshlet_proxy_adopted_connections_total" + l),
		HandoverFailures: r.Counter(fmt.Sprintf("meshlet_proxy_errors_total{direction=%q,kind=\"handover\"}", d)),
	}
}

// Forwarder is the L4 passthrough handler: it connects to the original
// destination and copies bytes both ways with half-close.
type Forwarder struct {
	Options [2]DirectionOptions // indexed by Direction
	Metrics [2]*Metrics
	Log     *slog.Logger
	// CheckInterval is how often a connection's two sockets are looked at
	// for a reset nobody is reading (a copy blocked writing to a peer that
	// reads nothing does not see its own source reset) and for the idle
	// timeout; 0: 10s, or a quarter of the idle timeout when that is shorter.
	CheckInterval time.Duration
}

var _ Handler = (*Forwarder)(nil)

// ServeConn forwards c to its original destination.
func (f *Forwarder) ServeConn(ctx context.Context, c *Conn) {
	_ = f.Forward(ctx, c, nil)
}

// Forward connects to c.OrigDst, writes prefix (bytes a sniffing handler
// already read from the client) and then relays until both directions are
// done, the connection idles out, it is handed over to the next generation,
// or ctx is cancelled. The client is closed on return (this process's
// descriptor: a handed-over connection lives on in the successor).
func (f *Forwarder) Forward(ctx context.Context, c *Conn, prefix []byte) error {
	opts := f.Options[c.Direction]
	m := f.Metrics[c.Direction]
	defer c.Client.Close()
	up, err := f.dial(ctx, opts, c.OrigDst)
	if err != nil {
		m.ConnectErrors.Inc()
		f.Log.Debug("connect to original destination failed", "direction", c.Direction, "dst", c.OrigDst, "err", err)
		// Reset the client, as the destination refusing would have.
		_ = c.Client.SetLinger(0)
		return err
	}
	defer up.Close()
	if len(prefix) > 0 {
		if _, err := up.Write(prefix); err != nil {
			return fmt.Errorf("writing sniffed prefix to %s: %w", c.OrigDst, err)
		}
		m.BytesReceived.Add(uint64(len(prefix)))
	}
	return f.relay(ctx, c, &Session{Direction: c.Direction, OrigDst: c.OrigDst, Accepted: c.Accepted, Client: c.Client, Upstream: up})
}

// Resume continues relaying s, a session handed over by the previous
// generation, with this Forwarder's settings; c is the connection as this
// generation serves it (its Client is s.Client), so a later drain can move
// it on again. Both sockets are closed on return, unless moved.
func (f *Forwarder) Resume(ctx context.Context, c *Conn, s *Session) error {
	defer s.Close()
	return f.relay(ctx, c, s)
}

func (f *Forwarder) dial(ctx context.Context, opts DirectionOptions, dst netip.AddrPort) (*net.TCPConn, error) {
	d := net.Dialer{Timeout: opts.ConnectTimeout}
	if d.Timeout == 0 {
		d.Timeout = 10 * time.Second
	}
	src := opts.SourceIPv4
	if dst.Addr().Is6() && !dst.Addr().Is4In6() {
		src = opts.SourceIPv6
	}
	if src.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	nc, err := d.DialContext(ctx, "tcp", dst.String())
	if err != nil {
		return nil, err
	}
	return nc.(*net.TCPConn), nil
}

// relay copies both ways, each direction with pump (read/write through a
// buffer held only while bytes move; splice(2) once a stream moves in bulk);
// at EOF the write side of the other connection is shut down (half-close),
// so protocols that half-close work end to end.
//
// When the generation drains and a successor takes connections
// (Conn.HandOver), the copies are interrupted and the session moves to the
// successor, whatever the connection carries and however long it lives. No
// successor (a shutdown drain, a standalone proxy) or a failed hand-over:
// the connection runs until it ends or the drain deadline cancels ctx.
func (f *Forwarder) relay(ctx context.Context, c *Conn, s *Session) error {
	opts := f.Options[s.Direction]
	m := f.Metrics[s.Direction]
	client, up := s.Client, s.Upstream
	type result struct {
		toUpstream bool
		r          copied
	}
	done := make(chan result, 2)
	running := 0
	start := func() {
		if !s.ClientDone {
			running++
			carry := s.ToUpstream
			s.ToUpstream = nil
			go func() {
				r := pump(up, client, carry)
				m.BytesReceived.Add(uint64(r.n))
				if r.err == nil {
					_ = up.CloseWrite()
				}
				done <- result{true, r}
			}()
		}
		if !s.UpstreamDone {
			running++
			carry := s.ToClient
			s.ToClient = nil
			go func() {
				r := pump(client, up, carry)
				m.BytesSent.Add(uint64(r.n))
				if r.err == nil {
					_ = client.CloseWrite()
				}
				done <- result{false, r}
			}()
		}
	}

	closeBoth := func(reset bool) {
		if reset {
			_ = client.SetLinger(0)
			_ = up.SetLinger(0)
		}
		_ = client.Close()
		_ = up.Close()
	}

	check := f.CheckInterval
	if check == 0 {
		check = 10 * time.Second
		if opts.IdleTimeout > 0 {
			check = min(check, max(opts.IdleTimeout/4, 50*time.Millisecond))
		}
	}
	checkTicker := time.NewTicker(check)
	defer checkTicker.Stop()
	checkTick := checkTicker.C
	draining := c.draining
	var (
		firstErr     error
		interrupting bool // the copies are being stopped for a hand-over
		failed       bool // a copy failed: the connection is closing
		cut          bool // closed at the drain deadline
	)
	start()
	for running > 0 {
		select {
		case res := <-done:
			running--
			r := res.r
			switch {
			case interrupting && r.interrupted():
				if res.toUpstream {
					s.ToUpstream = r.carry
				} else {
					s.ToClient = r.carry
				}
			case r.err == nil:
				if res.toUpstream {
					s.ClientDone = true
				} else {
					s.UpstreamDone = true
				}
			default:
				failed = true
				if errors.Is(r.err, net.ErrClosed) {
					break
				}
				if firstErr == nil {
					firstErr = r.err
				}
				// One side failed (reset): pass the reset on and stop.
				if errors.Is(r.err, syscall.ECONNRESET) {
					m.Resets.Inc()
					closeBoth(true)
				} else {
					closeBoth(false)
				}
			}
			if !interrupting || running > 0 || failed || s.ClientDone && s.UpstreamDone {
				continue
			}
			// Both copies stopped with the connection intact: move it.
			interrupting = false
			snd := c.handOver()
			err := errors.New("no successor")
			if snd != nil {
				err = snd.Send(s)
			}
			if err == nil {
				m.HandedOver.Inc()
				return nil
			}
			m.HandoverFailures.Inc()
			f.Log.Warn("hand-over failed; the connection stays with this generation", "direction", s.Direction, "dst", s.OrigDst, "err", err)
			_ = client.SetDeadline(time.Time{})
			_ = up.SetDeadline(time.Time{})
			start()
		case <-ctx.Done():
			cut = true
			closeBoth(false)
			ctx = context.Background()
		case <-checkTick:
			switch {
			case wasReset(client) || wasReset(up):
				// Both copies may be blocked elsewhere (writing to a
				// peer that reads nothing, reading from one that is
				// silent): pass the reset on now instead of at the idle
				// timeout.
				m.Resets.Inc()
				closeBoth(true)
				checkTick = nil
			case opts.IdleTimeout > 0 && idleFor(client, up) >= opts.IdleTimeout:
				m.IdleTimeouts.Inc()
				closeBoth(false)
				checkTick = nil
			}
		case <-draining:
			draining = nil
			if c.handOver() == nil {
				continue // served here until it ends or the drain deadline
			}
			// A deadline in the past stops both copies at their next
			// read or write; bytes read and not written come back as
			// carry, so nothing is lost or duplicated.
			interrupting = true
			past := time.Unix(1, 0)
			_ = client.SetDeadline(past)
			_ = up.SetDeadline(past)
		}
	}
	if cut {
		m.DrainCloses.Inc()
	}
	return firstErr
}

// tcpInfo reads TCP_INFO and the receive queue length of c.
func tcpInfo(c *net.TCPConn) (*unix.TCPInfo, int, bool) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, 0, false
	}
	var info *unix.TCPInfo
	var inq int
	var ierr error
	if err := rc.Control(func(fd uintptr) {
		info, ierr = unix.GetsockoptTCPInfo(int(fd), unix.SOL_TCP, unix.TCP_INFO)
		if ierr == nil {
			inq, ierr = unix.IoctlGetInt(int(fd), unix.SIOCINQ)
		}
	}); err != nil || ierr != nil {
		return nil, 0, false
	}
	return info, inq, true
}

// idleFor returns how long both connections have carried no data either way.
// wasReset reports whether c's peer aborted the connection: the kernel
// moved it to CLOSE with an error pending (a FIN alone leaves it in
// CLOSE_WAIT).
func wasReset(c *net.TCPConn) bool {
	info, _, ok := tcpInfo(c)
	return ok && info.State == unix.BPF_TCP_CLOSE
}

func idleFor(a, b *net.TCPConn) time.Duration {
	ia, _, ok1 := tcpInfo(a)
	ib, _, ok2 := tcpInfo(b)
	if !ok1 || !ok2 {
		return 0
	}
	ms := min(ia.Last_data_recv, ia.Last_data_sent, ib.Last_data_recv, ib.Last_data_sent)
	return time.Duration(ms) * time.Millisecond
}
