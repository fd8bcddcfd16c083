package identity

import (
	"crypto/x509"
	"time"
)

// Certs is the admin listener's /certs document, in the shape of Envoy's
// admin.v3.Certificates, so tools that read Envoy's /certs read ours: the
// workload chain and the CA certificates, never the key.
type Certs struct {
	Certificates []CertSet `json:"certificates"`
}

// CertSet is one certificate context (Envoy's admin.v3.Certificate).
type CertSet struct {
	CACert    []CertDetails `json:"ca_cert"`
	CertChain []CertDetails `json:"cert_chain"`
}

// CertDetails describes one certificate (Envoy's admin.v3.CertificateDetails).
type CertDetails struct {
	Path                string           `json:"path"`
	SerialNumber        string           `json:"serial_number"`
	SubjectAltNames     []SubjectAltName `json:"subject_alt_names"`
	DaysUntilExpiration int              `json:"days_until_expiration"`
	ValidFrom           time.Time        `json:"valid_from"`
	ExpirationTime      time.Time        `json:"expiration_time"`
}

// SubjectAltName is one SAN (Envoy's admin.v3.SubjectAlternateName).
type SubjectAltName struct {
	URI string `json:"uri,omitempty"`
	DNS string `json:"dns,omitempty"`
}

// Dump describes what s holds at now, as /certs shows it: one set with the
// workload chain (leaf first, then the intermediates it presents) and, as
// ca_cert, the trust anchors when they are known (given by SetBundle; a
// pool does not list its certificates). Empty before Set.
func (s *Store) Dump(now time.Time) Certs {
	out := Certs{Certificates: []CertSet{}}
	v := s.cur.Load()
	if v == nil || v.cert == nil {
		return out
	}
	set := CertSet{CACert: []CertDetails{}, CertChain: []CertDetails{}}
	for i, der := range v.cert.Certificate {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			continue
		}
		d := details(c, now)
		d.Path = "<inline: workload certificate>"
		if i > 0 {
			d.Path = "<inline: intermediate certificate>"
		}
		set.CertChain = append(set.CertChain, d)
	}
	for _, r := range v.rootList {
		d := details(r, now)
		d.Path = "<inline: mesh root>"
		set.CACert = append(set.CACert, d)
	}
	out.Certificates = append(out.Certificates, set)
	return out
}

func details(c *x509.Certificate, now time.Time) CertDetails {
	d := CertDetails{
		SerialNumber:        c.SerialNumber.Text(16),
		SubjectAltNames:     []SubjectAltName{},
		DaysUntilExpiration: max(0, int(c.NotAfter.Sub(now)/(24*time.Hour))),
		ValidFrom:           c.NotBefore.UTC(),
		ExpirationTime:      c.NotAfter.UTC(),
	}
	for _, u := range c.URIs {
		d.SubjectAltNames = append(d.SubjectAltNames, SubjectAltName{URI: u.String()})
	}
	for _, n := range c.DNSNames {
		d.SubjectAltNames = append(d.SubjectAltNames, SubjectAltName{DNS: n})
	}
	return d
}
