package certs

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"slices"
	"time"

	"github.com/meshlet/meshlet/internal/certpem"
)

// Keys of the certificate Secret. The layout is cert-manager's (ca.crt,
// tls.crt, tls.key) plus the CA's private key, so the same Secret can be read
// by tools that know the kubernetes.io/tls convention.
const (
	// KeyCABundle holds every CA certificate the webhook's clients must trust,
	// newest first. It is exactly what goes into caBundle.
	KeyCABundle = "ca.crt"
	// KeyCAKey holds the private key of the newest CA (the first in ca.crt).
	KeyCAKey = "ca.key"
	// KeyCert holds the serving certificate.
	KeyCert = "tls.crt"
	// KeyKey holds the serving certificate's private key.
	KeyKey = "tls.key"
)

// backdate is subtracted from NotBefore so that a peer whose clock is slightly
// behind ours still accepts a certificate issued a moment ago: five minutes,
// or a tenth of the validity for short-lived certificates.
func backdate(validity time.Duration) time.Duration {
	return min(5*time.Minute, validity/10)
}

// Authority is a certificate authority that can sign serving certificates.
type Authority struct {
	Cert *x509.Certificate
	Key  crypto.Signer
}

// NewAuthority creates a self-signed CA valid from now for validity.
func NewAuthority(now time.Time, validity time.Duration) (*Authority, []byte, []byte, error) {
	return NewAuthorityFor(now, validity, pkix.Name{CommonName: fmt.Sprintf("meshlet-webhook-ca@%d", now.Unix()), Organization: []string{"meshlet"}})
}

// NewAuthorityFor creates a self-signed ECDSA P-256 CA with subject, valid
// from now for validity, and returns it with its certificate and key PEM.
func NewAuthorityFor(now time.Time, validity time.Duration, subject pkix.Name) (*Authority, []byte, []byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("generating CA key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               subject,
		NotBefore:             now.Add(-backdate(validity)),
		NotAfter:              now.Add(validity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("signing CA certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("parsing CA certificate: %w", err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, nil, nil, err
	}
	return &Authority{Cert: cert, Key: key}, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM, nil
}

// Issue signs a serving certificate for dnsNames (and ipAddresses) valid from
// now for validity, and returns its certificate and key PEM.
func (a *Authority) Issue(now time.Time, validity time.Duration, dnsNames []string, ips []net.IP) ([]byte, []byte, error) {
	if len(dnsNames) == 0 && len(ips) == 0 {
		return nil, nil, errors.New("issuing serving certificate: no DNS names or IP addresses")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, fmt.Errorf("generating serving key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, nil, err
	}
	notAfter := now.Add(validity)
	if notAfter.After(a.Cert.NotAfter) {
		notAfter = a.Cert.NotAfter // a leaf never outlives its CA
	}
	cn := "meshlet-webhook"
	if len(dnsNames) > 0 {
		cn = dnsNames[0]
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject:      pkix.Name{CommonName: cn, Organization: []string{"meshlet"}},
		NotBefore:    now.Add(-backdate(validity)),
		NotAfter:     notAfter,
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     dnsNames,
		IPAddresses:  ips,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, a.Cert, key.Public(), a.Key)
	if err != nil {
		return nil, nil, fmt.Errorf("signing serving certificate: %w", err)
	}
	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), keyPEM, nil
}

func randomSerial() (*big.Int, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generating serial number: %w", err)
	}
	return serial, nil
}

func encodeKey(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encoding private key: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), nil
}

// parseAuthority reads the newest CA (the first certificate of bundle) and
// its key, and checks that they belong together.
func parseAuthority(bundle, keyPEM []byte) (*Authority, error) {
	cas, err := certpem.ParseCertificates(bundle)
	if err != nil {
		return nil, err
	}
	if len(cas) == 0 {
		return nil, errors.New("no CA certificate")
	}
	pair, err := tls.X509KeyPair(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cas[0].Raw}), keyPEM)
	if err != nil {
		return nil, fmt.Errorf("CA key does not match the newest CA: %w", err)
	}
	signer, ok := pair.PrivateKey.(crypto.Signer)
	if !ok {
		return nil, errors.New("CA key cannot sign")
	}
	if !cas[0].IsCA {
		return nil, errors.New("newest CA certificate is not a CA")
	}
	return &Authority{Cert: cas[0], Key: signer}, nil
}

// encodeBundle writes certificates as one PEM bundle, in order.
func encodeBundle(certs []*x509.Certificate) []byte {
	var b bytes.Buffer
	for _, c := range certs {
		_ = pem.Encode(&b, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return b.Bytes()
}

// Verify reports whether the serving certificate in certPEM chains to one of
// the CAs in caBundle at time now and is valid for dnsName. It is what the API
// server checks when it calls the webhook, so readiness uses it.
func Verify(certPEM, caBundle []byte, dnsName string, now time.Time) error {
	leafs, err := certpem.ParseCertificates(certPEM)
	if err != nil {
		return err
	}
	if len(leafs) == 0 {
		return errors.New("no serving certificate")
	}
	cas, err := certpem.ParseCertificates(caBundle)
	if err != nil {
		return fmt.Errorf("caBundle: %w", err)
	}
	if len(cas) == 0 {
		return errors.New("caBundle is empty")
	}
	pool := x509.NewCertPool()
	for _, c := range cas {
		pool.AddCert(c)
	}
	inter := x509.NewCertPool()
	for _, c := range leafs[1:] {
		inter.AddCert(c)
	}
	_, err = leafs[0].Verify(x509.VerifyOptions{
		DNSName:       dnsName,
		Roots:         pool,
		Intermediates: inter,
		CurrentTime:   now,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return fmt.Errorf("serving certificate does not verify against caBundle: %w", err)
	}
	return nil
}

// containsCert reports whether bundle holds c.
func containsCert(bundle []*x509.Certificate, c *x509.Certificate) bool {
	return slices.ContainsFunc(bundle, func(b *x509.Certificate) bool { return b.Equal(c) })
}
