package upstream

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshlet/meshlet/proxy/config"
)

// TLS is a cluster's checked TLS settings: one client config per
// ALPN offer, sharing roots, client certificate and session cache.
type TLS struct {
	cluster string
	h1      *tls.Config // ALPN http/1.1: http1 clusters and HTTP/1 requests
	h2      *tls.Config // ALPN h2 (http2 clusters) or h2 and http/1.1 (auto)
	// h2Both: the h2 transport offers h2 and http/1.1 and speaks what the
	// server picks (protocol auto); otherwise it offers h2 only.
	h2Both bool
	// verifyIP: no SNI, no subjectAltNames, verification on — each
	// connection verifies its endpoint's IP address.
	verifyIP bool
	log      *slog.Logger
	m        *Metrics
}

// NewTLS checks cl.TLS (reading its files, see config.Cluster.LoadTLS;
// field names it in errors) and returns the client configuration, or nil
// for plain text. Handshake failures are logged to log (debug) and counted
// in m (either may be nil).
func NewTLS(cl *config.Cluster, field string, log *slog.Logger, m *Metrics) (*TLS, []error) {
	ct, errs := cl.LoadTLS(field)
	if ct == nil || len(errs) > 0 {
		return nil, errs
	}
	roots, clientCerts, sans := ct.Roots, ct.Certificates, ct.SubjectAltNames
	base := &tls.Config{
		RootCAs: roots,
		// Presents the client certificate (none in SIMPLE mode) and notes on
		// the connection that the server asked for one (see tlsRawConn).
		GetClientCertificate: func(info *tls.CertificateRequestInfo) (*tls.Certificate, error) {
			if rc, ok := info.Context().Value(tlsRawKey{}).(*tlsRawConn); ok {
				rc.certRequested = true
			}
			if len(clientCerts) > 0 {
				return &clientCerts[0], nil
			}
			return &tls.Certificate{}, nil
		},
		ServerName:         ct.ServerName,
		MinVersion:         ct.MinVersion,
		ClientSessionCache: tls.NewLRUClientSessionCache(0),
		InsecureSkipVerify: ct.InsecureSkipVerify, //nolint:gosec // the user asked for it; logged at load
	}
	if len(sans) > 0 {
		// Verified by VerifyConnection instead of crypto/tls' host-name check.
		base.InsecureSkipVerify = true //nolint:gosec // the chain and the SANs are verified below
		base.VerifyConnection = func(cs tls.ConnectionState) error { return verifySANs(cs, roots, sans) }
	}
	u := &TLS{cluster: cl.Name, verifyIP: base.ServerName == "" && !base.InsecureSkipVerify, log: log, m: m}
	u.h1 = base.Clone()
	u.h1.NextProtos = []string{"http/1.1"}
	u.h2 = base.Clone()
	u.h2.NextProtos = []string{"h2"}
	if cl.Protocol == "" || cl.Protocol == config.ProtoAuto {
		u.h2Both = true
		u.h2.NextProtos = []string{"h2", "http/1.1"}
	}
	return u, nil
}

// verifySANs verifies the server's chain against roots (nil: the system
// roots) for server authentication and requires one of sans among the
// leaf's subject alternative names.
func verifySANs(cs tls.ConnectionState, roots *x509.CertPool, sans []string) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("server sent no certificate")
	}
	leaf := cs.PeerCertificates[0]
	opts := x509.VerifyOptions{Roots: roots, Intermediates: x509.NewCertPool(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	for _, c := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(c)
	}
	if _, err := leaf.Verify(opts); err != nil {
		return err
	}
	for _, n := range sans {
		if strings.Contains(n, "://") {
			for _, u := range leaf.URIs {
				if u.String() == n {
					return nil
				}
			}
			continue
		}
		if leaf.VerifyHostname(n) == nil {
			return nil
		}
	}
	have := slices.Clone(leaf.DNSNames)
	for _, ip := range leaf.IPAddresses {
		have = append(have, ip.String())
	}
	for _, u := range leaf.URIs {
		have = append(have, u.String())
	}
	return fmt.Errorf("server certificate names %v match none of subjectAltNames %v", have, sans)
}

// setup wires the TLS dialers into a cluster's transports: net/http's (which
// then speak HTTP/1.1 or HTTP/2 by ALPN for https URLs) and the HTTP/1.1
// fast path. dial is the cluster's TCP dialer (it counts TCP connect
// failures); the handshake shares its connect timeout.
func (u *TLS) setup(h1, h2 *http.Transport, direct *h1Transport, dial func(ctx context.Context, network, addr string) (net.Conn, error), timeout time.Duration) {
	h1.DialTLSContext = u.dialer(dial, timeout, u.h1)
	h2.DialTLSContext = u.dialer(dial, timeout, u.h2)
	var p http.Protocols
	p.SetHTTP2(true)
	p.SetHTTP1(u.h2Both)
	h2.Protocols = &p
	direct.dial = u.dialer(dial, timeout, u.h1)
}

// DialHTTP1 returns a dial function that connects with dial and completes
// a TLS handshake offering http/1.1 within timeout, as the cluster's
// HTTP/1.1 transports do.
func (u *TLS) DialHTTP1(dial func(ctx context.Context, network, addr string) (net.Conn, error), timeout time.Duration) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return u.dialer(dial, timeout, u.h1)
}

// dialer returns a dial function that connects and completes the TLS
// handshake within timeout.
func (u *TLS) dialer(dial func(ctx context.Context, network, addr string) (net.Conn, error), timeout time.Duration, cfg *tls.Config) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		raw, err := dial(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		c := cfg
		if u.verifyIP {
			host, _, err := net.SplitHostPort(addr)
			if err != nil {
				raw.Close()
				return nil, &ConnectError{Err: err}
			}
			c = cfg.Clone()
			c.ServerName = host
		}
		rc := &tlsRawConn{Conn: raw}
		tc := tls.Client(rc, c)
		if err := tc.HandshakeContext(context.WithValue(ctx, tlsRawKey{}, rc)); err != nil {
			raw.Close()
			return nil, u.failed(addr, err)
		}
		if rc.certRequested && tc.ConnectionState().Version >= tls.VersionTLS13 {
			rc.verdictPending.Store(true)
		}
		return tc, nil
	}
}

// failed counts and logs a TLS failure with addr and returns it as a
// connect failure.
func (u *TLS) failed(addr string, err error) error {
	if u.m != nil {
		u.m.ConnectFailures.Inc()
		u.m.TLSFailures.Inc()
	}
	if u.log != nil {
		u.log.Debug("upstream TLS handshake failed", "cluster", u.cluster, "endpoint", addr, "err", err)
	}
	return &ConnectError{Err: fmt.Errorf("TLS handshake with %s: %w", addr, err)}
}

// TLSAttempt is what one upstream attempt learnt of its connection (from
// httptrace's GotConn), to classify its failure.
type TLSAttempt struct {
	rc     *tlsRawConn
	reused bool
}

// traced makes the attempt's transport report its connection into a.
func (u *TLS) traced(ctx context.Context, a *TLSAttempt) context.Context {
	return httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{GotConn: func(ci httptrace.GotConnInfo) {
		if tc, ok := ci.Conn.(*tls.Conn); ok {
			a.rc, _ = tc.NetConn().(*tlsRawConn)
		}
		a.reused = ci.Reused
	}})
}

// classify turns a failed attempt the server's TLS refused into a connect
// failure: a TLS alert it sent on an established connection, or any
// failure of a new TLS 1.3 connection on which the server asked for a
// client certificate. TLS 1.3 ends the client's handshake before the
// server has checked that certificate, so a server refusing it (none sent,
// unknown CA) fails the first request instead of the handshake: with an
// alert, or — depending on which side notices first — a reset, a broken
// pipe, or net/http's HTTP/2 "client conn could not be established", which
// drops the cause.
// cancelled says the attempt's context ended (timeout, pending limit,
// client gone): then the failure is ours, not the server's refusal.
func (u *TLS) classify(addr string, err error, a *TLSAttempt, cancelled bool) error {
	var ce *ConnectError
	if errors.As(err, &ce) || cancelled {
		return err
	}
	var oe *net.OpError
	if errors.As(err, &oe) && oe.Op == "remote error" || a.rc != nil && !a.reused && a.rc.verdictPending.Load() {
		return u.failed(addr, err)
	}
	return err
}

// errWouldBlock is nbConn's "no data now"; a timeout to crypto/tls, which
// keeps the connection usable after it.
var errWouldBlock error = wouldBlock{}

type wouldBlock struct{}

func (wouldBlock) Error() string   { return "l7: no data pending" }
func (wouldBlock) Timeout() bool   { return true }
func (wouldBlock) Temporary() bool { return true }

type tlsRawKey struct{}

// tlsRawConn is the TCP connection under an upstream TLS connection.
// While nonblock is set (only by the goroutine owning an h1Transport
// connection, in alive) a Read returns errWouldBlock instead of waiting.
type tlsRawConn struct {
	net.Conn
	certRequested bool // the server asked for a client certificate (set during the handshake)
	// verdictPending: TLS 1.3 and the server asked for a client
	// certificate, so it may still refuse it (see classify).
	verdictPending atomic.Bool
	raw            syscall.RawConn
	nonblock       bool
}

func (c *tlsRawConn) Read(p []byte) (int, error) {
	if !c.nonblock {
		return c.Conn.Read(p)
	}
	if c.raw == nil {
		sc, ok := c.Conn.(syscall.Conn)
		if !ok {
			return 0, errWouldBlock
		}
		rc, err := sc.SyscallConn()
		if err != nil {
			return 0, err
		}
		c.raw = rc
	}
	var n int
	var rerr error
	if err := c.raw.Read(func(fd uintptr) bool {
		n, rerr = unix.Read(int(fd), p)
		return true // never wait for readiness
	}); err != nil {
		return 0, err
	}
	switch {
	case rerr == unix.EAGAIN || rerr == unix.EINTR:
		return 0, errWouldBlock
	case rerr != nil:
		return 0, rerr
	case n == 0 && len(p) > 0:
		return 0, io.EOF
	}
	return n, nil
}
