package upstream

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync/atomic"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/mtls"
)

// MeshTLS is a cluster's mutual TLS with the workload identity (tls.mode
// ISTIO_MUTUAL): each new upstream connection to a meshed endpoint (with
// autoMTLS: an endpoint whose tlsMode is istio; otherwise every endpoint)
// completes a handshake presenting the workload certificate, offering
// Istio's ALPN for the connection's protocol, and verifying the server's
// SPIFFE ID against the cluster's subjectAltNames. Requests keep the http
// scheme: the TLS is below the HTTP/1.1 or h2c framing, as Envoy's
// transport socket is.
type MeshTLS struct {
	cluster string
	auto    bool
	h1, h2  *tls.Config
	// meshed holds the addresses (ip:port) of the endpoints whose tlsMode
	// is istio (autoMTLS only).
	meshed atomic.Pointer[map[string]bool]
	log    *slog.Logger
	m      *Metrics
}

// NewMeshTLS returns the mutual TLS of cl with identity id, nil unless its
// tls.mode is ISTIO_MUTUAL. Failures are counted in m (connect and TLS
// failures) and logged to log (a refused peer identity as a warning).
func NewMeshTLS(cl *config.Cluster, id mtls.Identity, log *slog.Logger, m *Metrics) *MeshTLS {
	if cl.TLS == nil || cl.TLS.Mode != config.TLSIstioMutual {
		return nil
	}
	mt := &MeshTLS{cluster: cl.Name, auto: cl.TLS.AutoMTLS, log: log, m: m,
		h1: mtls.ClientConfig(id, cl.TLS.SubjectAltNames, mtls.ClientHTTP1, cl.TLS.SNI),
		h2: mtls.ClientConfig(id, cl.TLS.SubjectAltNames, mtls.ClientH2, cl.TLS.SNI)}
	mt.setEndpoints(cl.Endpoints)
	return mt
}

// SetTLSModes records which of eps are meshed (Endpoint.TLSMode), for a
// cluster with automatic mutual TLS; the next connections follow it.
func (c *Cluster) SetTLSModes(eps []config.Endpoint) {
	if c.mesh != nil {
		c.mesh.setEndpoints(eps)
	}
}

// Mesh returns the cluster's mutual TLS, nil if it has none.
func (c *Cluster) Mesh() *MeshTLS { return c.mesh }

func (mt *MeshTLS) setEndpoints(eps []config.Endpoint) {
	m := make(map[string]bool, len(eps))
	for _, e := range eps {
		if e.TLSMode == config.EndpointTLSIstio {
			m[e.Address] = true
		}
	}
	mt.meshed.Store(&m)
}

// Uses reports whether connections to addr get mutual TLS.
func (mt *MeshTLS) Uses(addr string) bool {
	return !mt.auto || (*mt.meshed.Load())[addr]
}

// setup wraps the transports' dialers: h1 and the HTTP/1.1 fast path offer
// istio-http/1.1, h2 offers istio-h2. The handshake shares the connect
// timeout.
func (mt *MeshTLS) setup(h1, h2 *http.Transport, direct *h1Transport, dial func(ctx context.Context, network, addr string) (net.Conn, error), timeout time.Duration) {
	h1.DialContext = mt.dialer(dial, mt.h1, timeout)
	h2.DialContext = mt.dialer(dial, mt.h2, timeout)
	direct.dial = mt.dialer(dial, mt.h1, timeout)
}

func (mt *MeshTLS) dialer(dial func(ctx context.Context, network, addr string) (net.Conn, error), cfg *tls.Config, timeout time.Duration) func(ctx context.Context, network, addr string) (net.Conn, error) {
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, timeout)
		defer cancel()
		raw, err := dial(ctx, network, addr)
		if err != nil || !mt.Uses(addr) {
			return raw, err
		}
		return mt.handshake(ctx, raw, addr, cfg)
	}
}

// HandshakeH2 completes mutual TLS offering istio-h2 on raw, a new
// connection to addr (closed on failure), for the HTTP/2 frame forwarder.
// A failure is counted, logged and returned as a *ConnectError.
func (mt *MeshTLS) HandshakeH2(ctx context.Context, raw net.Conn, addr string) (net.Conn, error) {
	return mt.handshake(ctx, raw, addr, mt.h2)
}

func (mt *MeshTLS) handshake(ctx context.Context, raw net.Conn, addr string, cfg *tls.Config) (net.Conn, error) {
	// Under a tlsRawConn, so the HTTP/1.1 fast path can check an idle
	// connection without blocking (h1Conn.alive).
	tc, err := mtls.Dial(ctx, &tlsRawConn{Conn: raw}, cfg)
	if err != nil {
		if mt.m != nil {
			mt.m.ConnectFailures.Inc()
			mt.m.TLSFailures.Inc()
		}
		if mt.log != nil {
			if errors.Is(err, mtls.ErrPeerIdentity) {
				mt.log.Warn("upstream mTLS peer identity refused", "cluster", mt.cluster, "endpoint", addr, "err", err)
			} else {
				mt.log.Debug("upstream mTLS handshake failed", "cluster", mt.cluster, "endpoint", addr, "err", err)
			}
		}
		return nil, &ConnectError{Err: fmt.Errorf("mTLS with %s: %w", addr, err)}
	}
	return tc, nil
}
