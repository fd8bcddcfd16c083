// Package mtlstest issues workload certificates from a real meshlet CA
// (package webhook/ca, in process) for tests of mutual TLS between
// sidecars.
package mtlstest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"testing"
	"time"

	"github.com/meshlet/meshlet/webhook/ca"
)

// TrustDomain is the trust domain of the certificates issued.
const TrustDomain = "cluster.local"

// CA is a self-signed mesh root signing workload certificates.
type CA struct {
	auth  *ca.Authority
	roots *x509.CertPool
}

// NewCA creates a fresh root, as the control plane does on an empty
// namespace.
func NewCA(t testing.TB) *CA {
	t.Helper()
	now := time.Now()
	data, err := ca.NewSelfSigned(now, 24*time.Hour, TrustDomain)
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.ParseSecret("test", data, now)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, r := range a.Roots() {
		pool.AddCert(r)
	}
	return &CA{auth: a, roots: pool}
}

// Roots returns the pool of the CA's root.
func (c *CA) Roots() *x509.CertPool { return c.roots }

// SPIFFE returns the SPIFFE ID of ns/sa.
func SPIFFE(ns, sa string) string {
	return ca.Identity{TrustDomain: TrustDomain, Namespace: ns, ServiceAccount: sa}.String()
}

// Issue signs a certificate for service account sa of namespace ns, with a
// fresh P-256 key, through the CA's CSR path (chain leaf first, Leaf set).
func (c *CA) Issue(t testing.TB, ns, sa string) *tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id := ca.Identity{TrustDomain: TrustDomain, Namespace: ns, ServiceAccount: sa}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := ca.ParseCSR(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), id)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := c.auth.Sign(csr, id, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert := &tls.Certificate{PrivateKey: key, Leaf: chain[0]}
	for _, x := range chain {
		cert.Certificate = append(cert.Certificate, x.Raw)
	}
	return cert
}
