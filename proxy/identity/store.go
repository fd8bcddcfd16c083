package identity

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"sync/atomic"
)

// ErrNoIdentity is returned by the Store's tls.Config hooks before the
// first certificate was set.
var ErrNoIdentity = errors.New("no workload identity yet")

// Store holds the workload certificate and the mesh's trust anchors that a
// proxy generation serves and verifies mTLS with. The agent obtains them
// (Client) and hands every renewal to each generation, which keeps it here.
// Readers never block: each handshake loads the current value, so a
// rotation takes effect on the next handshake and never touches
// established connections.
//
// The zero value is ready to use and holds nothing; a Store is safe for
// concurrent use.
type Store struct {
	cur atomic.Pointer[storeValue]
}

// storeValue is one immutable identity: it is replaced, never edited.
type storeValue struct {
	cert     *tls.Certificate
	roots    *x509.CertPool
	identity string
	// rootList are the roots as certificates, when known (SetBundle), for
	// Dump: a pool does not list its certificates.
	rootList []*x509.Certificate
}

// Set puts cert (key in memory, chain leaf first, cert.Leaf parsed) and
// roots (the mesh's trust anchors) in use for every handshake that starts
// from now on. Neither may be changed by the caller afterwards.
func (s *Store) Set(cert *tls.Certificate, roots *x509.CertPool) { s.set(cert, roots, nil) }

func (s *Store) set(cert *tls.Certificate, roots *x509.CertPool, list []*x509.Certificate) {
	v := &storeValue{cert: cert, roots: roots, rootList: list}
	if cert != nil && cert.Leaf != nil && len(cert.Leaf.URIs) > 0 {
		v.identity = cert.Leaf.URIs[0].String()
	}
	s.cur.Store(v)
}

// Certificate returns the workload certificate in use, or nil before Set.
func (s *Store) Certificate() *tls.Certificate {
	if v := s.cur.Load(); v != nil {
		return v.cert
	}
	return nil
}

// Roots returns the mesh's trust anchors, or nil before Set.
func (s *Store) Roots() *x509.CertPool {
	if v := s.cur.Load(); v != nil {
		return v.roots
	}
	return nil
}

// Identity returns the workload's SPIFFE ID (the leaf's URI SAN,
// spiffe://<trust domain>/ns/<ns>/sa/<sa>), or "" before Set.
func (s *Store) Identity() string {
	if v := s.cur.Load(); v != nil {
		return v.identity
	}
	return ""
}

// GetCertificate is tls.Config.GetCertificate: the workload certificate for
// inbound mTLS, or ErrNoIdentity before Set.
func (s *Store) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	if c := s.Certificate(); c != nil {
		return c, nil
	}
	return nil, ErrNoIdentity
}

// GetClientCertificate is tls.Config.GetClientCertificate: the workload
// certificate for outbound mTLS, or ErrNoIdentity before Set.
func (s *Store) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return s.GetCertificate(nil)
}

// ControlPlaneTLS returns the client TLS configuration for a mesh
// control-plane server (the discovery server's TLS port, 15012): it presents
// the workload certificate and accepts a server certificate for serverName
// that verifies against the Store's roots, both read per handshake, so a
// rotation applies to the next connection.
func (s *Store) ControlPlaneTLS(serverName string) *tls.Config {
	return &tls.Config{
		MinVersion:           tls.VersionTLS12,
		ServerName:           serverName,
		GetClientCertificate: s.GetClientCertificate,
		// The roots are the Store's at the handshake, not a pool fixed
		// here: VerifyConnection checks the chain and the name instead.
		InsecureSkipVerify: true, //nolint:gosec // verified in VerifyConnection against the Store's roots
		VerifyConnection: func(cs tls.ConnectionState) error {
			roots := s.Roots()
			if roots == nil {
				return ErrNoIdentity
			}
			if len(cs.PeerCertificates) == 0 {
				return errors.New("control plane presented no certificate")
			}
			inter := x509.NewCertPool()
			for _, c := range cs.PeerCertificates[1:] {
				inter.AddCert(c)
			}
			if _, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{DNSName: serverName, Roots: roots, Intermediates: inter,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
				return fmt.Errorf("control plane certificate for %s does not verify against the mesh roots: %w", serverName, err)
			}
			return nil
		},
	}
}
