package identity

import (
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"errors"
	"fmt"
)

// bundleVersion is the version of the bundle encoding; a bundle of another
// version is refused, so an agent and a generation of different builds
// never misread each other.
const bundleVersion = 1

// MaxBundleSize bounds an encoded bundle: it must fit in one control-socket
// datagram (the receiver's buffer). A chain of a few certificates, a P-256
// key and a few roots take 2–5 KiB.
const MaxBundleSize = 64 << 10

// bundle is the wire form of one workload identity: DER certificates (leaf
// first), the PKCS#8 key and the DER trust anchors, as one ASN.1 SEQUENCE.
type bundle struct {
	Version int
	Chain   [][]byte
	Key     []byte
	Roots   [][]byte
}

// MarshalBundle encodes cert (chain leaf first, key in memory) and the trust
// anchors roots for handing to a proxy generation. The result holds the
// private key: it goes over a socket between two processes of the pod and
// must never be written to disk or logged.
func MarshalBundle(cert *tls.Certificate, roots []*x509.Certificate) ([]byte, error) {
	if cert == nil || len(cert.Certificate) == 0 || cert.PrivateKey == nil {
		return nil, errors.New("identity bundle: no certificate or key")
	}
	if len(roots) == 0 {
		return nil, errors.New("identity bundle: no trust anchor")
	}
	key, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		return nil, fmt.Errorf("identity bundle: encoding the key: %w", err)
	}
	b := bundle{Version: bundleVersion, Chain: cert.Certificate, Key: key}
	for _, r := range roots {
		b.Roots = append(b.Roots, r.Raw)
	}
	out, err := asn1.Marshal(b)
	if err != nil {
		return nil, fmt.Errorf("identity bundle: %w", err)
	}
	if len(out) > MaxBundleSize {
		return nil, fmt.Errorf("identity bundle: %d bytes, more than %d", len(out), MaxBundleSize)
	}
	return out, nil
}

// UnmarshalBundle decodes a bundle made by MarshalBundle and checks it: the
// key is the leaf's, the leaf carries a SPIFFE ID and chains to one of the
// roots. The returned certificate has Leaf set.
func UnmarshalBundle(data []byte) (*tls.Certificate, *x509.CertPool, error) {
	cert, roots, _, err := unmarshalBundle(data)
	return cert, roots, err
}

// unmarshalBundle is UnmarshalBundle that also returns the roots as a list.
func unmarshalBundle(data []byte) (*tls.Certificate, *x509.CertPool, []*x509.Certificate, error) {
	var b bundle
	rest, err := asn1.Unmarshal(data, &b)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("identity bundle: %w", err)
	}
	if len(rest) > 0 {
		return nil, nil, nil, fmt.Errorf("identity bundle: %d trailing bytes", len(rest))
	}
	if b.Version != bundleVersion {
		return nil, nil, nil, fmt.Errorf("identity bundle: version %d, want %d", b.Version, bundleVersion)
	}
	if len(b.Chain) == 0 || len(b.Roots) == 0 {
		return nil, nil, nil, fmt.Errorf("identity bundle: %d certificates and %d roots, want at least one of each", len(b.Chain), len(b.Roots))
	}
	chain := make([]*x509.Certificate, len(b.Chain))
	for i, der := range b.Chain {
		if chain[i], err = x509.ParseCertificate(der); err != nil {
			return nil, nil, nil, fmt.Errorf("identity bundle: certificate %d: %w", i, err)
		}
	}
	roots := x509.NewCertPool()
	rootList := make([]*x509.Certificate, 0, len(b.Roots))
	for i, der := range b.Roots {
		r, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, nil, nil, fmt.Errorf("identity bundle: root %d: %w", i, err)
		}
		roots.AddCert(r)
		rootList = append(rootList, r)
	}
	key, err := x509.ParsePKCS8PrivateKey(b.Key)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("identity bundle: key: %w", err)
	}
	signer, ok := key.(crypto.Signer)
	type equaler interface{ Equal(crypto.PublicKey) bool }
	if pub, eq := chain[0].PublicKey.(equaler); !ok || !eq || !pub.Equal(signer.Public()) {
		return nil, nil, nil, errors.New("identity bundle: the key is not the leaf certificate's")
	}
	leaf := chain[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].Scheme != "spiffe" {
		return nil, nil, nil, fmt.Errorf("identity bundle: leaf has %d URI SANs, want one SPIFFE ID", len(leaf.URIs))
	}
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	// The chain is checked as of the leaf's start, not now: the agent
	// checked the times when it obtained the certificate, and an expired
	// one (the CA down past expiry) must still reach a new generation, or
	// a restart would leave the proxy without any.
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: leaf.NotBefore,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, nil, nil, fmt.Errorf("identity bundle: leaf %s does not verify against its roots: %w", leaf.URIs[0], err)
	}
	return &tls.Certificate{Certificate: b.Chain, PrivateKey: key, Leaf: leaf}, roots, rootList, nil
}

// SetBundle decodes a bundle (UnmarshalBundle) and puts it in use. A bundle
// that does not decode or check leaves the Store as it was.
func (s *Store) SetBundle(data []byte) error {
	cert, roots, list, err := unmarshalBundle(data)
	if err != nil {
		return err
	}
	s.set(cert, roots, list)
	return nil
}
