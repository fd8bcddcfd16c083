// Package mtls is the sidecar's mutual TLS between workloads, with Istio's
// wire conventions: the ALPN values Istio's sidecars offer and accept, the
// tls.Config of the inbound (server) and outbound (client) side built from
// the workload identity (package proxy/identity's Store), the check of the
// peer's SPIFFE ID against the destination's service accounts, the inbound
// PeerAuthentication modes (STRICT, PERMISSIVE with ClientHello detection,
// DISABLE) and the X-Forwarded-Client-Cert value the application sees.
//
// Certificates and roots are read from the identity at every handshake, so
// a rotation (Store.Set) takes effect for the next handshake and never
// touches established connections. An identity without a certificate yet
// fails every handshake: STRICT ports refuse everything, PERMISSIVE ports
// keep serving plain text.
package mtls

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"slices"
	"strings"
	"sync"
)

// Istio's ALPN values for in-mesh mutual TLS. A client sidecar offers
// PeerExchange, then the protocol-specific value, then Istio; the server
// side accepts ServerProtocols (Istio's inbound TLS filter chain match).
const (
	PeerExchange = "istio-peer-exchange"
	Istio        = "istio"
	HTTP10       = "istio-http/1.0"
	HTTP11       = "istio-http/1.1"
	H2           = "istio-h2"
)

// ServerProtocols are the ALPN values an inbound mutual TLS chain accepts
// (its filter_chain_match.application_protocols).
var ServerProtocols = []string{PeerExchange, Istio, HTTP10, HTTP11, H2}

// Client ALPN offers by upstream protocol.
var (
	// ClientHTTP1 is offered on connections carrying HTTP/1.1.
	ClientHTTP1 = []string{PeerExchange, HTTP11, Istio}
	// ClientH2 is offered on connections carrying HTTP/2 (and gRPC).
	ClientH2 = []string{PeerExchange, H2, Istio}
	// ClientTCP is offered on connections carrying opaque TCP.
	ClientTCP = []string{PeerExchange, Istio}
)

// PeerAuthentication modes (security.istio.io/v1 PeerAuthentication
// spec.mtls.mode).
const (
	Strict     = "STRICT"
	Permissive = "PERMISSIVE"
	Disable    = "DISABLE"
)

// ValidMode reports whether m is one of the three modes.
func ValidMode(m string) bool { return m == Strict || m == Permissive || m == Disable }

// TLSModeIstio is the value of an endpoint's tlsMode (the pod label
// security.istio.io/tlsMode, sent in EDS metadata) that marks it meshed.
const TLSModeIstio = "istio"

// Identity is the workload identity a sidecar presents and trusts:
// *identity.Store of package proxy/identity. GetCertificate and
// GetClientCertificate fail until the first certificate is set.
type Identity interface {
	GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error)
	GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error)
	// Roots are the trust anchors peers' chains must verify against (nil
	// before the first certificate).
	Roots() *x509.CertPool
	// Identity is our SPIFFE ID ("" before the first certificate).
	Identity() string
}

// ErrNoRoots is a handshake failure before the identity has trust anchors.
var ErrNoRoots = errors.New("mtls: no trust anchors yet (no workload certificate)")

// ErrPeerIdentity marks a peer whose certificate carries none of the
// expected SPIFFE IDs.
var ErrPeerIdentity = errors.New("mtls: peer identity not allowed")

// Server builds the tls.Config of inbound mutual TLS from an identity:
// the client must present a certificate that verifies against the
// identity's current roots for client authentication. The config is cached
// per roots pool, so session tickets resume across connections until the
// roots change.
type Server struct {
	id Identity
	// base is the config every connection starts from: one value, so its
	// session ticket keys (which crypto/tls takes from it, not from the
	// per-client config) are shared and tickets resume.
	base   *tls.Config
	mu     sync.Mutex
	roots  *x509.CertPool
	cached *tls.Config
}

// NewServer returns the inbound TLS of id.
func NewServer(id Identity) *Server {
	s := &Server{id: id}
	s.base = &tls.Config{GetConfigForClient: s.forClient, MinVersion: tls.VersionTLS12}
	return s
}

// Config is the tls.Config to pass to tls.Server (the same for every
// connection; do not modify it).
func (s *Server) Config() *tls.Config { return s.base }

func (s *Server) forClient(*tls.ClientHelloInfo) (*tls.Config, error) {
	roots := s.id.Roots()
	if roots == nil {
		return nil, ErrNoRoots
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cached == nil || s.roots != roots {
		s.roots = roots
		s.cached = &tls.Config{
			GetCertificate: s.id.GetCertificate,
			ClientAuth:     tls.RequireAndVerifyClientCert,
			ClientCAs:      roots,
			NextProtos:     ServerProtocols,
			MinVersion:     tls.VersionTLS12,
			// The peer must be a workload: a SPIFFE URI SAN.
			VerifyConnection: func(cs tls.ConnectionState) error {
				if PeerIdentity(&cs) == "" {
					return fmt.Errorf("%w: client certificate carries no spiffe URI SAN", ErrPeerIdentity)
				}
				return nil
			},
		}
	}
	return s.cached, nil
}

// ClientConfig returns the tls.Config of outbound mutual TLS with id:
// offering alpn, presenting id's certificate, verifying the server's chain
// against id's roots at each handshake, and requiring one of sans (SPIFFE
// IDs; empty: any identity of the trust anchors) among its URI SANs. A
// mismatch fails the handshake with an error wrapping ErrPeerIdentity.
// serverName is the SNI sent (Istio's outbound_.PORT_._.HOST; may be
// empty). The config carries its own session cache, so connections to the
// same endpoint resume, until the certificate rotates: a resumed session
// keeps the certificate it was made with, so the cache is emptied when the
// identity's certificate changes.
func ClientConfig(id Identity, sans []string, alpn []string, serverName string) *tls.Config {
	sans = slices.Clone(sans)
	return &tls.Config{
		GetClientCertificate: id.GetClientCertificate,
		NextProtos:           alpn,
		ServerName:           serverName,
		MinVersion:           tls.VersionTLS12,
		ClientSessionCache:   &sessionCache{id: id},
		// The chain and the SPIFFE ID are verified below against the roots
		// of the moment, not crypto/tls' host-name check.
		InsecureSkipVerify: true, //nolint:gosec // verified in VerifyConnection
		VerifyConnection: func(cs tls.ConnectionState) error {
			return VerifyPeer(cs.PeerCertificates, id.Roots(), x509.ExtKeyUsageServerAuth, sans)
		},
	}
}

// VerifyPeer verifies chain (leaf first) against roots for usage and
// requires one of sans among the leaf's URI SANs (empty sans: any spiffe
// URI SAN).
func VerifyPeer(chain []*x509.Certificate, roots *x509.CertPool, usage x509.ExtKeyUsage, sans []string) error {
	if roots == nil {
		return ErrNoRoots
	}
	if len(chain) == 0 {
		return errors.New("mtls: peer sent no certificate")
	}
	opts := x509.VerifyOptions{Roots: roots, Intermediates: x509.NewCertPool(), KeyUsages: []x509.ExtKeyUsage{usage}}
	for _, c := range chain[1:] {
		opts.Intermediates.AddCert(c)
	}
	if _, err := chain[0].Verify(opts); err != nil {
		return fmt.Errorf("mtls: verifying peer certificate: %w", err)
	}
	have := spiffeURIs(chain[0])
	if len(have) == 0 {
		return fmt.Errorf("%w: peer certificate carries no spiffe URI SAN", ErrPeerIdentity)
	}
	if len(sans) == 0 {
		return nil
	}
	for _, h := range have {
		if slices.Contains(sans, h) {
			return nil
		}
	}
	return fmt.Errorf("%w: peer is %v, expected one of %v", ErrPeerIdentity, have, sans)
}

func spiffeURIs(c *x509.Certificate) []string {
	var out []string
	for _, u := range c.URIs {
		if u.Scheme == "spiffe" {
			out = append(out, u.String())
		}
	}
	return out
}

// PeerIdentity returns the SPIFFE ID of the verified peer of cs: the first
// spiffe URI SAN of its leaf when the chain was verified, else "".
func PeerIdentity(cs *tls.ConnectionState) string {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.PeerCertificates) == 0 {
		return ""
	}
	if u := spiffeURIs(cs.PeerCertificates[0]); len(u) > 0 {
		return u[0]
	}
	return ""
}

// Namespace returns the namespace segment of a SPIFFE ID
// (spiffe://TD/ns/NS/sa/SA), "" if it has none.
func Namespace(spiffeID string) string {
	u, err := url.Parse(spiffeID)
	if err != nil {
		return ""
	}
	parts := strings.Split(strings.TrimPrefix(u.Path, "/"), "/")
	for i := 0; i+1 < len(parts); i += 2 {
		if parts[i] == "ns" {
			return parts[i+1]
		}
	}
	return ""
}

// XFCCHeader is the header carrying the client certificate details.
const XFCCHeader = "X-Forwarded-Client-Cert"

// XFCC returns the X-Forwarded-Client-Cert value for a request received on
// cs by the workload by (our SPIFFE ID), as Istio's sidecars set it:
// By=<by>;Hash=<hex SHA-256 of the peer's DER leaf>;URI=<peer SPIFFE ID>.
// It returns "" when cs has no verified peer.
func XFCC(by string, cs *tls.ConnectionState) string {
	peer := PeerIdentity(cs)
	if peer == "" {
		return ""
	}
	sum := sha256.Sum256(cs.PeerCertificates[0].Raw)
	var b strings.Builder
	b.Grow(len(by) + len(peer) + 64 + 20)
	if by != "" {
		b.WriteString("By=")
		b.WriteString(by)
		b.WriteByte(';')
	}
	b.WriteString("Hash=")
	b.WriteString(hex.EncodeToString(sum[:]))
	b.WriteString(";URI=")
	b.WriteString(peer)
	return b.String()
}

// sessionCache is a client session cache valid for one workload
// certificate: the first Get or Put after a rotation drops every session.
type sessionCache struct {
	id    Identity
	mu    sync.Mutex
	cert  *tls.Certificate
	inner tls.ClientSessionCache
}

func (c *sessionCache) current() tls.ClientSessionCache {
	cert, _ := c.id.GetClientCertificate(nil)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.inner == nil || cert != c.cert {
		c.cert, c.inner = cert, tls.NewLRUClientSessionCache(0)
	}
	return c.inner
}

// Get implements tls.ClientSessionCache.
func (c *sessionCache) Get(key string) (*tls.ClientSessionState, bool) { return c.current().Get(key) }

// Put implements tls.ClientSessionCache.
func (c *sessionCache) Put(key string, cs *tls.ClientSessionState) { c.current().Put(key, cs) }
