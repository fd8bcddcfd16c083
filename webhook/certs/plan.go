package certs

import (
	"bytes"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"slices"
	"time"

	"github.com/meshlet/meshlet/internal/certpem"
)

// Policy says what the webhook's certificates must look like.
type Policy struct {
	// DNSNames of the serving certificate; the first is the one the API
	// server dials (service.namespace.svc). Required.
	DNSNames []string
	// IPs are extra IP SANs (tests serve on 127.0.0.1).
	IPs []net.IP
	// CAValidity is the lifetime of a new CA. Zero means 10 years.
	CAValidity time.Duration
	// CertValidity is the lifetime of a new serving certificate. Zero means one year.
	CertValidity time.Duration
}

// Defaults for Policy's zero values.
const (
	DefaultCAValidity   = 10 * 365 * 24 * time.Hour
	DefaultCertValidity = 365 * 24 * time.Hour
)

func (p Policy) caValidity() time.Duration {
	if p.CAValidity > 0 {
		return p.CAValidity
	}
	return DefaultCAValidity
}

func (p Policy) certValidity() time.Duration {
	if p.CertValidity > 0 {
		return p.CertValidity
	}
	return DefaultCertValidity
}

// dueForRenewal reports whether c has used up two thirds of its lifetime: a
// certificate is replaced with a third of its life left, so a replica that
// misses a few reconcile rounds still never serves an expired one.
func dueForRenewal(c *x509.Certificate, now time.Time) bool {
	life := c.NotAfter.Sub(c.NotBefore)
	return !now.Before(c.NotBefore.Add(life * 2 / 3))
}

// Plan computes the certificate Secret's next content from its current
// content. published reports whether a CA certificate is already in the
// caBundle of every webhook configuration: a serving certificate signed by a
// new CA is only issued once the API server trusts that CA, so a CA rotation
// never fails an admission. Plan returns changed=false and data unchanged when
// nothing needs doing; reason says what it did.
func Plan(data map[string][]byte, now time.Time, p Policy, published func(*x509.Certificate) bool) (out map[string][]byte, changed bool, reason string, err error) {
	if len(p.DNSNames) == 0 {
		return nil, false, "", fmt.Errorf("certificate policy: no DNS names")
	}
	out = make(map[string][]byte, 4)
	for k, v := range data {
		out[k] = v
	}
	ca, caErr := parseAuthority(data[KeyCABundle], data[KeyCAKey])
	if caErr != nil || !now.Before(ca.Cert.NotAfter) {
		// Nothing usable: start over. Nobody can be trusting a CA we cannot
		// sign with, so there is nothing to keep.
		auth, caPEM, keyPEM, err := NewAuthority(now, p.caValidity())
		if err != nil {
			return nil, false, "", err
		}
		crt, key, err := auth.Issue(now, p.certValidity(), p.DNSNames, p.IPs)
		if err != nil {
			return nil, false, "", err
		}
		out[KeyCABundle], out[KeyCAKey], out[KeyCert], out[KeyKey] = caPEM, keyPEM, crt, key
		return out, true, "created CA and serving certificate", nil
	}

	bundle, _ := certpem.ParseCertificates(data[KeyCABundle]) // parsed once already by parseAuthority
	// Drop expired CAs (never the newest, checked above).
	kept := slices.DeleteFunc(slices.Clone(bundle), func(c *x509.Certificate) bool { return !now.Before(c.NotAfter) })
	var reasons []string
	if len(kept) != len(bundle) {
		reasons = append(reasons, "dropped expired CA")
	}
	if dueForRenewal(ca.Cert, now) {
		auth, _, keyPEM, err := NewAuthority(now, p.caValidity())
		if err != nil {
			return nil, false, "", err
		}
		ca = auth
		kept = append([]*x509.Certificate{auth.Cert}, kept...)
		out[KeyCAKey] = keyPEM
		reasons = append(reasons, "rotated CA")
	}
	if nb := encodeBundle(kept); !bytes.Equal(nb, data[KeyCABundle]) {
		out[KeyCABundle] = nb
	}

	issue, why := servingNeedsIssue(data[KeyCert], data[KeyKey], kept, ca, now, p, published)
	if issue {
		crt, key, err := ca.Issue(now, p.certValidity(), p.DNSNames, p.IPs)
		if err != nil {
			return nil, false, "", err
		}
		out[KeyCert], out[KeyKey] = crt, key
		reasons = append(reasons, "issued serving certificate: "+why)
	}
	if len(reasons) == 0 {
		return data, false, "", nil
	}
	return out, true, joinReasons(reasons), nil
}

// servingNeedsIssue decides whether a new serving certificate is due.
func servingNeedsIssue(crtPEM, keyPEM []byte, bundle []*x509.Certificate, ca *Authority, now time.Time, p Policy, published func(*x509.Certificate) bool) (bool, string) {
	if _, err := tls.X509KeyPair(crtPEM, keyPEM); err != nil {
		return true, "missing or unreadable"
	}
	leafs, err := certpem.ParseCertificates(crtPEM)
	if err != nil || len(leafs) == 0 {
		return true, "missing or unreadable"
	}
	leaf := leafs[0]
	if err := Verify(crtPEM, encodeBundle(bundle), p.DNSNames[0], now); err != nil {
		return true, "not valid against the CA bundle"
	}
	if !slices.Equal(leaf.DNSNames, p.DNSNames) || !sameIPs(leaf.IPAddresses, p.IPs) {
		return true, "names changed"
	}
	signedByNewest := leaf.CheckSignatureFrom(ca.Cert) == nil
	if !signedByNewest {
		// A CA rotation is under way: move to the new CA only once the API
		// server trusts it; until then the old certificate is still valid.
		if published(ca.Cert) {
			return true, "moving to the new CA"
		}
		return false, ""
	}
	if dueForRenewal(leaf, now) {
		return true, "due for renewal"
	}
	return false, ""
}

func sameIPs(a, b []net.IP) bool {
	return slices.EqualFunc(a, b, func(x, y net.IP) bool { return x.Equal(y) })
}

func joinReasons(r []string) string {
	var b bytes.Buffer
	for i, s := range r {
		if i > 0 {
			b.WriteString("; ")
		}
		b.WriteString(s)
	}
	return b.String()
}
