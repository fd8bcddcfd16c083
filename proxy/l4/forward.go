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
	DrainCloses   *stats.Counter
	Resets        *stats.Counter
	Active        atomic.Int64 // this generation only
}

// NewMetrics registers the counters of direction d in r.
func NewMetrics(r *stats.Region, d Direction) *Metrics {
	l := fmt.Sprintf("{direction=%q}", d)
	return &Metrics{
		Connections:   r.Counter("meshlet_proxy_connections_total" + l),
		BytesReceived: r.Counter("meshlet_proxy_received_bytes_total" + l),
		BytesSent:     r.Counter("meshlet_proxy_sent_bytes_total" + l),
		ConnectErrors: r.Counter(fmt.Sprintf("meshlet_proxy_errors_total{direction=%q,kind=\"connect\"}", d)),
		IdleTimeouts:  r.Counter(fmt.Sprintf("meshlet_proxy_errors_total{direction=%q,kind=\"idle_timeout\"}", d)),
		Resets:        r.Counter(fmt.Sprintf("meshlet_proxy_errors_total{direction=%q,kind=\"reset\"}", d)),
		DrainCloses:   r.Counter("meshlet_proxy_drain_closed_connections_total" + l),
	}
}

// Forwarder is the L4 passthrough handler: it connects to the original
// destination and copies bytes both ways with half-close.
type Forwarder struct {
	Options [2]DirectionOptions // indexed by Direction
	Metrics [2]*Metrics
	Log     *slog.Logger
	// QuietPeriod is how long both directions must be silent before a
	// draining connection is closed; 0: 1ms (TCP_INFO's resolution). Longer
	// periods never close connections that are busy but idle between
	// requests (keep-alive at a few ms per request).
	QuietPeriod time.Duration
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
// done, the connection idles out, the generation drains and the connection
// goes quiet, or ctx is cancelled. The client is closed on return.
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
	return f.relay(ctx, c, up, prefix, opts, m)
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

// relay copies both ways, each direction with copyConn (read/write through
// a buffer held only while bytes move; splice(2) once a stream moves in
// bulk); at EOF the write side of the other connection is shut down
// (half-close), so protocols that half-close work end to end.
//
// While draining, a connection that carries HTTP/1 (judged from the
// client's first bytes) is closed as soon as it is quiescent between a
// response and the next request, which HTTP/1.1 allows and clients retry;
// any other stream runs until it ends or the drain deadline cancels ctx.
func (f *Forwarder) relay(ctx context.Context, c *Conn, up *net.TCPConn, prefix []byte, opts DirectionOptions, m *Metrics) error {
	client := c.Client
	done := make(chan error, 2)
	var http1 atomic.Bool
	if prefix != nil {
		http1.Store(isHTTP1(prefix))
	}
	go func() {
		if prefix == nil {
			http1.Store(peekHTTP1(client))
		}
		n, err := copyConn(up, client)
		m.BytesReceived.Add(uint64(n))
		if err == nil {
			_ = up.CloseWrite()
		}
		done <- err
	}()
	go func() {
		n, err := copyConn(client, up)
		m.BytesSent.Add(uint64(n))
		if err == nil {
			_ = client.CloseWrite()
		}
		done <- err
	}()

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
	var drainTick <-chan time.Time
	quiet := f.QuietPeriod
	if quiet == 0 {
		quiet = time.Millisecond
	}
	var firstErr error
	for pending := 2; pending > 0; {
		select {
		case err := <-done:
			pending--
			if err != nil && !errors.Is(err, net.ErrClosed) {
				if firstErr == nil {
					firstErr = err
				}
				// One side failed (reset): pass the reset on and stop.
				if errors.Is(err, syscall.ECONNRESET) {
					m.Resets.Inc()
					closeBoth(true)
				} else {
					closeBoth(false)
				}
			}
		case <-ctx.Done():
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
			t := time.NewTicker(max(quiet/2, 2*time.Millisecond))
			defer t.Stop()
			drainTick = t.C
		case <-drainTick:
			if http1.Load() && quiescent(client, up, quiet) {
				m.DrainCloses.Inc()
				closeBoth(false)
				drainTick = nil
			}
		}
	}
	return firstErr
}

// httpMethods are the request-line starts that mark an HTTP/1 connection.
var httpMethods = []string{"GET ", "HEAD ", "POST ", "PUT ", "DELETE ", "OPTIONS ", "PATCH ", "TRACE ", "CONNECT "}

func isHTTP1(b []byte) bool {
	for _, m := range httpMethods {
		if len(b) >= len(m) && string(b[:len(m)]) == m || len(b) < len(m) && len(b) >= 3 && m[:len(b)] == string(b) {
			return true
		}
	}
	return false
}

// peekHTTP1 waits for the client's first bytes and looks at them with
// MSG_PEEK, so nothing is consumed and the copy keeps its splice path.
func peekHTTP1(c *net.TCPConn) bool {
	rc, err := c.SyscallConn()
	if err != nil {
		return false
	}
	var buf [8]byte
	var n int
	_ = rc.Read(func(fd uintptr) bool {
		var rerr error
		n, _, rerr = unix.Recvfrom(int(fd), buf[:], unix.MSG_PEEK)
		return rerr != unix.EAGAIN
	})
	return n > 0 && isHTTP1(buf[:n])
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

// quiescent reports whether a connection can be closed during a drain
// without cutting an exchange: nothing unread in either socket (closing then
// would send a reset), the server (upstream) spoke after the client did —
// for request/response protocols such as HTTP/1.1 keep-alive, no request is
// outstanding — and both sides have been silent for at least quiet. Bytes
// still in a send queue are delivered before the FIN, so unacknowledged
// data (the client delays its ACK until its next request) does not matter.
func quiescent(client, up *net.TCPConn, quiet time.Duration) bool {
	ic, inqC, ok1 := tcpInfo(client)
	iu, inqU, ok2 := tcpInfo(up)
	if !ok1 || !ok2 {
		return true // already closed
	}
	if inqC != 0 || inqU != 0 {
		return false
	}
	q := uint32(quiet / time.Millisecond)
	if ic.Last_data_recv < q || iu.Last_data_recv < q {
		return false
	}
	// Smaller "last received" = more recent. The upstream must have spoken
	// after the client's last bytes (TCP_INFO has millisecond resolution, so
	// a tie counts as after: a response on loopback often comes in the same
	// millisecond as its request).
	return iu.Last_data_recv <= ic.Last_data_recv && iu.Data_segs_in > 0
}
