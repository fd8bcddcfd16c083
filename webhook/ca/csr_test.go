package ca

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"net"
	"net/url"
	"strings"
	"testing"
	"time"
)

var reviews = Identity{TrustDomain: DefaultTrustDomain, Namespace: "team-a", ServiceAccount: "reviews"}

func csrPEM(t *testing.T, key crypto.Signer, tmpl *x509.CertificateRequest) []byte {
	t.Helper()
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// TestParseCSRRefusals: every CSR that cannot be signed for the caller is
// refused with the sentinel the server maps to a gRPC code and a message
// naming what is wrong.
func TestParseCSRRefusals(t *testing.T) {
	p256, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	rsa1024, _ := rsa.GenerateKey(rand.Reader, 1024)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	foreign, _ := url.Parse("spiffe://cluster.local/ns/team-a/sa/ratings")
	own := reviews.URI()
	good := csrPEM(t, p256, &x509.CertificateRequest{URIs: []*url.URL{own}})
	tampered := []byte(strings.Replace(string(good), string(good[100:104]), "AAAA", 1))

	cases := []struct {
		name     string
		csr      []byte
		sentinel error
		contains string
	}{
		{"empty", nil, ErrBadCSR, "not PEM"},
		{"wrong PEM type", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: []byte{1}}), ErrBadCSR, `"CERTIFICATE"`},
		{"not DER", pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: []byte{1, 2, 3}}), ErrBadCSR, "parsing csr"},
		{"bad signature", tampered, ErrBadCSR, "csr"},
		{"curve P-224", csrPEM(t, p224, &x509.CertificateRequest{}), ErrBadCSR, "P-224"},
		{"RSA 1024", csrPEM(t, rsa1024, &x509.CertificateRequest{}), ErrBadCSR, "1024 bits"},
		{"ed25519", csrPEM(t, ed, &x509.CertificateRequest{}), ErrBadCSR, "ed25519"},
		{"foreign URI", csrPEM(t, p256, &x509.CertificateRequest{URIs: []*url.URL{foreign}}), ErrForeignIdentity, "sa/ratings"},
		{"own and foreign URI", csrPEM(t, p256, &x509.CertificateRequest{URIs: []*url.URL{own, foreign}}), ErrForeignIdentity, "sa/ratings"},
		{"DNS SAN", csrPEM(t, p256, &x509.CertificateRequest{DNSNames: []string{"evil.example"}}), ErrForeignIdentity, "evil.example"},
		{"IP SAN", csrPEM(t, p256, &x509.CertificateRequest{IPAddresses: []net.IP{net.IPv4(10, 0, 0, 1)}}), ErrForeignIdentity, "10.0.0.1"},
		{"email SAN", csrPEM(t, p256, &x509.CertificateRequest{EmailAddresses: []string{"a@b.c"}}), ErrForeignIdentity, "a@b.c"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseCSR(tc.csr, reviews)
			if !errors.Is(err, tc.sentinel) || !strings.Contains(err.Error(), tc.contains) {
				t.Errorf("ParseCSR: %v; want %v containing %q", err, tc.sentinel, tc.contains)
			}
		})
	}
	if _, err := ParseCSR(good, reviews); err != nil {
		t.Errorf("own CSR refused: %v", err)
	}
}

// TestSignCarriesOnlyTheCallersIdentity: the leaf's SAN is the caller's
// SPIFFE ID (critical, no subject), for both client and server use, and never
// outlives the signing certificate.
func TestSignCarriesOnlyTheCallersIdentity(t *testing.T) {
	now := time.Now()
	data, err := NewSelfSigned(now, time.Hour, DefaultTrustDomain)
	if err != nil {
		t.Fatal(err)
	}
	a, err := ParseSecret("test", data, now)
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	csr, err := ParseCSR(csrPEM(t, key, &x509.CertificateRequest{}), reviews)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := a.Sign(csr, reviews, now, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	leaf := chain[0]
	if len(chain) != 2 || !chain[1].Equal(a.Certificate()) {
		t.Errorf("chain of %d, want leaf and root", len(chain))
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != "spiffe://cluster.local/ns/team-a/sa/reviews" {
		t.Errorf("URIs %v", leaf.URIs)
	}
	if !leaf.NotAfter.Equal(a.Certificate().NotAfter) {
		t.Errorf("leaf NotAfter %s outlives or differs from the CA's %s (lifetime clamped to the CA)", leaf.NotAfter, a.Certificate().NotAfter)
	}
	if leaf.IsCA {
		t.Error("leaf is a CA")
	}
	critical := false
	for _, e := range leaf.Extensions {
		if e.Id.Equal([]int{2, 5, 29, 17}) {
			critical = e.Critical
		}
	}
	if !critical {
		t.Error("SAN extension is not critical although the subject is empty")
	}
}

// TestLifetime: 0 means the default, above the cap is clamped, negative is
// refused naming the field.
func TestLifetime(t *testing.T) {
	s := &Server{opts: ServerOptions{DefaultTTL: 24 * time.Hour, MaxTTL: 90 * 24 * time.Hour}}
	for _, tc := range []struct {
		in   int64
		want time.Duration
	}{{0, 24 * time.Hour}, {3600, time.Hour}, {int64(365 * 24 * 3600), 90 * 24 * time.Hour}, {1 << 62, 90 * 24 * time.Hour}} {
		if got, err := s.lifetime(tc.in); err != nil || got != tc.want {
			t.Errorf("lifetime(%d) = %s, %v; want %s", tc.in, got, err, tc.want)
		}
	}
	if _, err := s.lifetime(-1); err == nil || !strings.Contains(err.Error(), "validity_duration") {
		t.Errorf("lifetime(-1): %v", err)
	}
}

// TestIdentityFromUsername: only service-account user names map to an
// identity.
func TestIdentityFromUsername(t *testing.T) {
	id, err := identityFromUsername("example.org", "system:serviceaccount:team-a:reviews")
	if err != nil || id.String() != "spiffe://example.org/ns/team-a/sa/reviews" {
		t.Errorf("got %v, %v", id, err)
	}
	for _, u := range []string{"admin", "system:serviceaccount:team-a", "system:serviceaccount::x", "system:serviceaccount:a:b:c", "system:node:n1"} {
		if _, err := identityFromUsername(DefaultTrustDomain, u); err == nil {
			t.Errorf("%q accepted", u)
		}
	}
}

// TestParseSecretRefusals: unusable CA material is an error naming the key.
func TestParseSecretRefusals(t *testing.T) {
	now := time.Now()
	good, _ := NewSelfSigned(now, time.Hour, DefaultTrustDomain)
	other, _ := NewSelfSigned(now, time.Hour, DefaultTrustDomain)
	for _, tc := range []struct {
		name     string
		data     map[string][]byte
		contains string
	}{
		{"no cert", map[string][]byte{KeyCAKey: good[KeyCAKey]}, KeyCACert + ": missing"},
		{"no key", map[string][]byte{KeyCACert: good[KeyCACert]}, KeyCAKey + ": missing"},
		{"key of another CA", map[string][]byte{KeyCACert: good[KeyCACert], KeyCAKey: other[KeyCAKey]}, "does not match"},
		{"root that did not sign", map[string][]byte{KeyCACert: good[KeyCACert], KeyCAKey: good[KeyCAKey], KeyRootCert: other[KeyCACert]}, "does not chain"},
		{"expired", good, "does not chain"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			at := now
			if tc.name == "expired" {
				at = now.Add(2 * time.Hour)
			}
			_, err := ParseSecret("secret ns/cacerts", tc.data, at)
			if err == nil || !strings.Contains(err.Error(), tc.contains) || !strings.Contains(err.Error(), "secret ns/cacerts") {
				t.Errorf("got %v, want an error naming the secret and containing %q", err, tc.contains)
			}
		})
	}
}
