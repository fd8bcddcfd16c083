package identity

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
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
}

// Set puts cert (key in memory, chain leaf first, cert.Leaf parsed) and
// roots (the mesh's trust anchors) in use for every handshake that starts
// from now on. Neither may be changed by the caller afterwards.
func (s *Store) Set(cert *tls.Certificate, roots *x509.CertPool) {
	v := &storeValue{cert: cert, roots: roots}
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
