package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/meshlet/meshlet/internal/certpem"
	"github.com/meshlet/meshlet/webhook/certs"
)

// Keys of the CA Secrets, Istio's: the plug-in cacerts Secret has all four,
// the self-signed istio-ca-secret only ca-cert.pem and ca-key.pem.
const (
	KeyCACert    = "ca-cert.pem"
	KeyCAKey     = "ca-key.pem"
	KeyRootCert  = "root-cert.pem"
	KeyCertChain = "cert-chain.pem"
)

// ErrForeignIdentity means a CSR asked for a SAN other than the caller's
// own identity.
var ErrForeignIdentity = errors.New("CSR asks for an identity the caller does not have")

// ErrBadCSR means a CSR could not be used (malformed, bad signature,
// unsupported key).
var ErrBadCSR = errors.New("unusable CSR")

// Authority signs workload certificates. It is immutable: a new signing
// material is a new Authority.
type Authority struct {
	signer  crypto.Signer
	cert    *x509.Certificate   // the signing certificate (root or intermediate)
	tail    []*x509.Certificate // what follows the leaf in a chain, root last
	roots   []*x509.Certificate
	rootPEM []byte
	source  string
}

// Source says where the signing material came from ("secret ns/name").
func (a *Authority) Source() string { return a.source }

// RootPEM returns the trust anchors (root-cert.pem) as PEM.
func (a *Authority) RootPEM() []byte { return a.rootPEM }

// Roots returns the trust anchors.
func (a *Authority) Roots() []*x509.Certificate { return a.roots }

// Certificate returns the signing certificate.
func (a *Authority) Certificate() *x509.Certificate { return a.cert }

// NewSelfSigned creates a self-signed ECDSA P-256 root for trustDomain, valid
// from now for validity, and returns it as Secret data (ca-cert.pem,
// ca-key.pem).
func NewSelfSigned(now time.Time, validity time.Duration, trustDomain string) (map[string][]byte, error) {
	_, certPEM, keyPEM, err := certs.NewAuthorityFor(now, validity, pkix.Name{Organization: []string{trustDomain}, CommonName: "meshlet-mesh-root"})
	if err != nil {
		return nil, err
	}
	return map[string][]byte{KeyCACert: certPEM, KeyCAKey: keyPEM}, nil
}

// ParseSecret builds an Authority from CA Secret data (source names the
// Secret in errors). ca-cert.pem and ca-key.pem are required; root-cert.pem
// is required unless ca-cert.pem is itself the root; cert-chain.pem, when
// present, is ca-cert.pem followed by its intermediates (Istio's layout).
// The signing certificate must chain to a root of root-cert.pem at now.
func ParseSecret(source string, data map[string][]byte, now time.Time) (*Authority, error) {
	fail := func(key string, err error) (*Authority, error) {
		return nil, fmt.Errorf("%s key %s: %w", source, key, err)
	}
	if len(data[KeyCACert]) == 0 {
		return fail(KeyCACert, errors.New("missing or empty"))
	}
	if len(data[KeyCAKey]) == 0 {
		return fail(KeyCAKey, errors.New("missing or empty"))
	}
	pa, err := certs.ParseAuthority(data[KeyCACert], data[KeyCAKey])
	if err != nil {
		return fail(KeyCACert+"/"+KeyCAKey, err)
	}
	if pa.Cert.KeyUsage != 0 && pa.Cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return fail(KeyCACert, errors.New("certificate may not sign certificates (key usage lacks certSign)"))
	}
	roots, err := certpem.ParseCertificates(data[KeyRootCert])
	if err != nil {
		return fail(KeyRootCert, err)
	}
	if len(roots) == 0 {
		if !isSelfSigned(pa.Cert) {
			return fail(KeyRootCert, errors.New("missing or empty, and ca-cert.pem is not a self-signed root"))
		}
		roots = []*x509.Certificate{pa.Cert}
	}
	chain, err := certpem.ParseCertificates(data[KeyCertChain])
	if err != nil {
		return fail(KeyCertChain, err)
	}
	if len(chain) > 0 && !chain[0].Equal(pa.Cert) {
		chain = append([]*x509.Certificate{pa.Cert}, chain...)
	}
	if len(chain) == 0 {
		chain = []*x509.Certificate{pa.Cert}
	}
	pool, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := pa.Cert.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return fail(KeyCACert, fmt.Errorf("signing certificate does not chain to root-cert.pem: %w", err))
	}
	tail := chain
	if last := tail[len(tail)-1]; !isSelfSigned(last) || !containsCert(roots, last) {
		tail = append(tail, rootOf(last, roots))
	}
	return &Authority{
		signer:  pa.Key,
		cert:    pa.Cert,
		tail:    tail,
		roots:   roots,
		rootPEM: certs.EncodeCertificates(roots),
		source:  source,
	}, nil
}

func isSelfSigned(c *x509.Certificate) bool {
	return c.CheckSignatureFrom(c) == nil
}

func containsCert(list []*x509.Certificate, c *x509.Certificate) bool {
	for _, l := range list {
		if l.Equal(c) {
			return true
		}
	}
	return false
}

// rootOf returns the root that signed c (the first root when none did: the
// chain then verified through an intermediate that is itself trusted).
func rootOf(c *x509.Certificate, roots []*x509.Certificate) *x509.Certificate {
	for _, r := range roots {
		if c.CheckSignatureFrom(r) == nil {
			return r
		}
	}
	return roots[0]
}

// ParseCSR decodes a PEM certificate request, checks its signature and key,
// and checks that every SAN it asks for is id (a CSR may also ask for none).
func ParseCSR(csrPEM []byte, id Identity) (*x509.CertificateRequest, error) {
	block, _ := pem.Decode(csrPEM)
	if block == nil {
		return nil, fmt.Errorf("%w: csr is not PEM", ErrBadCSR)
	}
	if block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("%w: csr PEM block is %q, want \"CERTIFICATE REQUEST\"", ErrBadCSR, block.Type)
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: parsing csr: %w", ErrBadCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: csr signature: %w", ErrBadCSR, err)
	}
	switch k := csr.PublicKey.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return nil, fmt.Errorf("%w: csr key: ECDSA curve %s is not supported (P-256, P-384)", ErrBadCSR, k.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		if k.N.BitLen() < 2048 {
			return nil, fmt.Errorf("%w: csr key: RSA key of %d bits is too short (at least 2048)", ErrBadCSR, k.N.BitLen())
		}
	default:
		return nil, fmt.Errorf("%w: csr key: %T is not supported (ECDSA P-256/P-384 or RSA)", ErrBadCSR, csr.PublicKey)
	}
	want := id.String()
	for _, u := range csr.URIs {
		if u.String() != want {
			return nil, fmt.Errorf("%w: csr URI SAN %q, caller is %q", ErrForeignIdentity, u, want)
		}
	}
	if len(csr.DNSNames) > 0 {
		return nil, fmt.Errorf("%w: csr DNS SAN %q, caller is %q", ErrForeignIdentity, csr.DNSNames, want)
	}
	if len(csr.IPAddresses) > 0 {
		return nil, fmt.Errorf("%w: csr IP SAN %v, caller is %q", ErrForeignIdentity, csr.IPAddresses, want)
	}
	if len(csr.EmailAddresses) > 0 {
		return nil, fmt.Errorf("%w: csr email SAN %q, caller is %q", ErrForeignIdentity, csr.EmailAddresses, want)
	}
	return csr, nil
}

// Sign issues a workload certificate for csr's public key with exactly id as
// its URI SAN, valid from now for ttl (never beyond the signing
// certificate), and returns the chain: leaf first, root last.
func (a *Authority) Sign(csr *x509.CertificateRequest, id Identity, now time.Time, ttl time.Duration) ([]*x509.Certificate, error) {
	if ttl <= 0 {
		return nil, fmt.Errorf("certificate lifetime %s is not positive", ttl)
	}
	serial, err := certs.NewSerial()
	if err != nil {
		return nil, err
	}
	notAfter := now.Add(ttl)
	if notAfter.After(a.cert.NotAfter) {
		notAfter = a.cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		// No subject: the identity is the URI SAN, which x509 then marks
		// critical (RFC 5280 4.2.1.6), as Istio's workload certificates are.
		NotBefore:             now.Add(-certs.Backdate(ttl)),
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{id.URI()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, csr.PublicKey, a.signer)
	if err != nil {
		return nil, fmt.Errorf("signing certificate for %s: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parsing issued certificate: %w", err)
	}
	return append([]*x509.Certificate{leaf}, a.tail...), nil
}

// IssueServing issues the certificate server's own serving certificate for
// dnsNames with a fresh in-memory key, valid from now for ttl, as the chain
// to present (leaf first) and its key.
func (a *Authority) IssueServing(dnsNames []string, now time.Time, ttl time.Duration) ([]*x509.Certificate, crypto.Signer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generating serving key: %w", err)
	}
	serial, err := certs.NewSerial()
	if err != nil {
		return nil, nil, err
	}
	notAfter := now.Add(ttl)
	if notAfter.After(a.cert.NotAfter) {
		notAfter = a.cert.NotAfter
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: dnsNames[0]},
		NotBefore:    now.Add(-certs.Backdate(ttl)),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     dnsNames,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.cert, key.Public(), a.signer)
	if err != nil {
		return nil, nil, fmt.Errorf("signing serving certificate: %w", err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, fmt.Errorf("parsing serving certificate: %w", err)
	}
	// The root is left out: the client has it, and sending it only costs bytes.
	chain := []*x509.Certificate{leaf}
	for _, c := range a.tail {
		if !containsCert(a.roots, c) {
			chain = append(chain, c)
		}
	}
	return chain, key, nil
}
