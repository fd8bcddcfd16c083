package l7

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// UpstreamTLS is a cluster's TLS origination policy, after Istio's
// DestinationRule trafficPolicy.tls (ClientTLSSettings). The files are read
// and checked when the config is validated, so a bad file is a config error
// (a hot restart with it keeps the old generation serving). The agent
// watches them (Config.Files) and hot-restarts when their contents change.
type UpstreamTLS struct {
	// Mode is DISABLE (default: plain text), SIMPLE (TLS, the server is
	// verified) or MUTUAL (SIMPLE plus a client certificate). ISTIO_MUTUAL
	// is refused: meshlet has no mesh identity to present.
	Mode string `json:"mode,omitempty"`
	// CACertificates is a PEM file of the CAs that verify the server's
	// certificate (absolute path); empty: the system roots.
	CACertificates string `json:"caCertificates,omitempty"`
	// ClientCertificate and PrivateKey are PEM files (absolute paths) of the
	// certificate chain the proxy presents; MUTUAL only, and required there.
	ClientCertificate string `json:"clientCertificate,omitempty"`
	PrivateKey        string `json:"privateKey,omitempty"`
	// SNI is the server name sent in the ClientHello and the name the server
	// certificate is verified against. Default: the cluster's dns.name; a
	// cluster of static endpoints sends no SNI and verifies each endpoint's
	// IP address (the certificate needs it as an IP SAN) unless SNI or
	// SubjectAltNames is set.
	SNI string `json:"sni,omitempty"`
	// SubjectAltNames, when set, replace the host-name check: the server
	// certificate (still verified against the CAs) must carry one of these
	// names — a DNS name (the certificate's wildcards match), an IP address,
	// or a URI such as spiffe://cluster.local/ns/default/sa/api.
	SubjectAltNames []string `json:"subjectAltNames,omitempty"`
	// InsecureSkipVerify accepts any server certificate (logged as a
	// warning when the config loads). Not with caCertificates or
	// subjectAltNames, which it would silently ignore.
	InsecureSkipVerify bool `json:"insecureSkipVerify,omitempty"`
	// MinProtocolVersion is TLSV1_2 (default) or TLSV1_3.
	MinProtocolVersion string `json:"minProtocolVersion,omitempty"`
}

// TLS origination modes.
const (
	TLSDisable     = "DISABLE"
	TLSSimple      = "SIMPLE"
	TLSMutual      = "MUTUAL"
	TLSIstioMutual = "ISTIO_MUTUAL"
)

// upstreamTLS is a cluster's checked TLS settings: one client config per
// ALPN offer, sharing roots, client certificate and session cache.
type upstreamTLS struct {
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
	m        *clusterMetrics
}

// buildUpstreamTLS checks cl.TLS (reading its files) and returns the client
// configuration, or nil for plain text. Every problem is returned, each
// naming its field (under field) and the bad value or path.
func buildUpstreamTLS(cl *Cluster, field string) (*upstreamTLS, []error) {
	t := cl.TLS
	if t == nil {
		return nil, nil
	}
	var errs []error
	bad := func(f, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s.%s: %s", field, f, fmt.Sprintf(format, a...)))
	}
	mode := t.Mode
	switch mode {
	case "", TLSDisable:
		mode = TLSDisable
	case TLSSimple, TLSMutual:
	case TLSIstioMutual:
		bad("mode", "%q is not available: meshlet has no mesh identity (workload certificates) yet; use MUTUAL with clientCertificate and privateKey", t.Mode)
		return nil, errs
	default:
		bad("mode", "%q must be one of DISABLE, SIMPLE, MUTUAL", t.Mode)
		return nil, errs
	}
	if mode == TLSDisable {
		for f, set := range map[string]bool{"caCertificates": t.CACertificates != "", "clientCertificate": t.ClientCertificate != "",
			"privateKey": t.PrivateKey != "", "sni": t.SNI != "", "subjectAltNames": len(t.SubjectAltNames) > 0,
			"insecureSkipVerify": t.InsecureSkipVerify, "minProtocolVersion": t.MinProtocolVersion != ""} {
			if set {
				bad(f, "is set but mode is DISABLE (plain text); set mode SIMPLE or MUTUAL")
			}
		}
		slices.SortFunc(errs, func(a, b error) int { return strings.Compare(a.Error(), b.Error()) })
		return nil, errs
	}

	read := func(f, path string) []byte {
		if !filepath.IsAbs(path) {
			bad(f, "%q must be an absolute path", path)
			return nil
		}
		b, err := readPEMFile(path)
		if err != nil {
			bad(f, "reading %q: %v", path, err)
			return nil
		}
		return b
	}
	var roots *x509.CertPool
	if t.CACertificates != "" {
		if b := read("caCertificates", t.CACertificates); b != nil {
			certs, err := parsePEMCertificates(b)
			if err != nil {
				bad("caCertificates", "%q: %v", t.CACertificates, err)
			} else {
				roots = x509.NewCertPool()
				for _, c := range certs {
					roots.AddCert(c)
				}
			}
		}
	}
	var clientCerts []tls.Certificate
	if mode == TLSMutual {
		if t.ClientCertificate == "" {
			bad("clientCertificate", "is required for mode MUTUAL")
		}
		if t.PrivateKey == "" {
			bad("privateKey", "is required for mode MUTUAL")
		}
		if t.ClientCertificate != "" && t.PrivateKey != "" {
			certPEM := read("clientCertificate", t.ClientCertificate)
			keyPEM := read("privateKey", t.PrivateKey)
			if certPEM != nil {
				if _, err := parsePEMCertificates(certPEM); err != nil {
					bad("clientCertificate", "%q: %v", t.ClientCertificate, err)
					certPEM = nil
				}
			}
			if certPEM != nil && keyPEM != nil {
				pair, err := tls.X509KeyPair(certPEM, keyPEM)
				switch {
				case err != nil && strings.Contains(err.Error(), "does not match"):
					bad("privateKey", "%q does not match clientCertificate %q", t.PrivateKey, t.ClientCertificate)
				case err != nil:
					bad("privateKey", "%q: %s", t.PrivateKey, strings.TrimPrefix(err.Error(), "tls: "))
				default:
					clientCerts = []tls.Certificate{pair}
				}
			}
		}
	} else {
		if t.ClientCertificate != "" {
			bad("clientCertificate", "%q is only used with mode MUTUAL (mode is %s)", t.ClientCertificate, mode)
		}
		if t.PrivateKey != "" {
			bad("privateKey", "%q is only used with mode MUTUAL (mode is %s)", t.PrivateKey, mode)
		}
	}
	if t.SNI != "" {
		if _, err := netip.ParseAddr(t.SNI); err == nil {
			bad("sni", "%q is an IP address, which TLS does not send as SNI; use subjectAltNames to verify an IP", t.SNI)
		} else if strings.ContainsAny(t.SNI, " /:*\t\r\n") || strings.Trim(t.SNI, ".") == "" {
			bad("sni", "%q is not a DNS name", t.SNI)
		}
	}
	for i, n := range t.SubjectAltNames {
		if strings.TrimSpace(n) == "" || strings.ContainsAny(n, " \t\r\n") {
			bad(fmt.Sprintf("subjectAltNames[%d]", i), "%q is not a name", n)
		}
	}
	if t.InsecureSkipVerify {
		if t.CACertificates != "" {
			bad("insecureSkipVerify", "true ignores caCertificates %q; set one or the other", t.CACertificates)
		}
		if len(t.SubjectAltNames) > 0 {
			bad("insecureSkipVerify", "true ignores subjectAltNames; set one or the other")
		}
	}
	minVersion := uint16(tls.VersionTLS12)
	switch t.MinProtocolVersion {
	case "", "TLSV1_2":
	case "TLSV1_3":
		minVersion = tls.VersionTLS13
	case "TLSV1_0", "TLSV1_1":
		bad("minProtocolVersion", "%q is not supported (TLS 1.2 is the oldest version meshlet speaks)", t.MinProtocolVersion)
	default:
		bad("minProtocolVersion", "%q must be TLSV1_2 or TLSV1_3", t.MinProtocolVersion)
	}
	if len(errs) > 0 {
		return nil, errs
	}

	sni := t.SNI
	if sni == "" && cl.DNS != nil {
		sni = strings.TrimSuffix(cl.DNS.Name, ".")
	}
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
		ServerName:         strings.TrimSuffix(sni, "."),
		MinVersion:         minVersion,
		ClientSessionCache: tls.NewLRUClientSessionCache(0),
		InsecureSkipVerify: t.InsecureSkipVerify, //nolint:gosec // the user asked for it; logged at load
	}
	if sans := t.SubjectAltNames; len(sans) > 0 {
		// Verified by VerifyConnection instead of crypto/tls' host-name check.
		base.InsecureSkipVerify = true //nolint:gosec // the chain and the SANs are verified below
		base.VerifyConnection = func(cs tls.ConnectionState) error { return verifySANs(cs, roots, sans) }
	}
	u := &upstreamTLS{cluster: cl.Name, verifyIP: base.ServerName == "" && !base.InsecureSkipVerify}
	u.h1 = base.Clone()
	u.h1.NextProtos = []string{"http/1.1"}
	u.h2 = base.Clone()
	u.h2.NextProtos = []string{"h2"}
	if cl.Protocol == "" || cl.Protocol == ProtoAuto {
		u.h2Both = true
		u.h2.NextProtos = []string{"h2", "http/1.1"}
	}
	return u, nil
}

// maxPEMFile bounds what is read of a certificate or key file.
const maxPEMFile = 1 << 20

// readPEMFile reads a regular file of at most maxPEMFile bytes (a device
// such as /dev/zero given by mistake must not hang the config load).
func readPEMFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return nil, err
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return nil, err
	} else if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("not a regular file (%s)", st.Mode().Type())
	}
	b, err := io.ReadAll(io.LimitReader(f, maxPEMFile+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxPEMFile {
		return nil, fmt.Errorf("larger than %d bytes", maxPEMFile)
	}
	return b, nil
}

// parsePEMCertificates returns every CERTIFICATE block of a PEM file.
func parsePEMCertificates(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(out)+1, err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		return nil, errors.New("no PEM CERTIFICATE block found")
	}
	return out, nil
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
func (u *upstreamTLS) setup(h1, h2 *http.Transport, direct *h1Transport, dial func(ctx context.Context, network, addr string) (net.Conn, error), timeout time.Duration) {
	h1.DialTLSContext = u.dialer(dial, timeout, u.h1)
	h2.DialTLSContext = u.dialer(dial, timeout, u.h2)
	var p http.Protocols
	p.SetHTTP2(true)
	p.SetHTTP1(u.h2Both)
	h2.Protocols = &p
	direct.dial = u.dialer(dial, timeout, u.h1)
}

// dialer returns a dial function that connects and completes the TLS
// handshake within timeout.
func (u *upstreamTLS) dialer(dial func(ctx context.Context, network, addr string) (net.Conn, error), timeout time.Duration, cfg *tls.Config) func(ctx context.Context, network, addr string) (net.Conn, error) {
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
				return nil, &connectError{err}
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
func (u *upstreamTLS) failed(addr string, err error) error {
	if u.m != nil {
		u.m.connectFailures.Inc()
		u.m.tlsFailures.Inc()
	}
	if u.log != nil {
		u.log.Debug("upstream TLS handshake failed", "cluster", u.cluster, "endpoint", addr, "err", err)
	}
	return &connectError{fmt.Errorf("TLS handshake with %s: %w", addr, err)}
}

// tlsAttempt is what one upstream attempt learnt of its connection (from
// httptrace's GotConn), to classify its failure.
type tlsAttempt struct {
	rc     *tlsRawConn
	reused bool
}

// traced makes the attempt's transport report its connection into a.
func (u *upstreamTLS) traced(ctx context.Context, a *tlsAttempt) context.Context {
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
func (u *upstreamTLS) classify(addr string, err error, a *tlsAttempt, cancelled bool) error {
	var ce *connectError
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
