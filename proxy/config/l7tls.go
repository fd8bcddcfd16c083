package config

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/meshlet/meshlet/internal/certpem"
)

// UpstreamTLS is a cluster's TLS origination policy, after Istio's
// DestinationRule trafficPolicy.tls (ClientTLSSettings). The files are read
// and checked when the config is validated, so a bad file is a config error
// (a hot restart with it keeps the old generation serving). The agent
// watches them (Config.Files) and hot-restarts when their contents change.
type UpstreamTLS struct {
	// Mode is DISABLE (default: plain text), SIMPLE (TLS, the server is
	// verified), MUTUAL (SIMPLE plus a client certificate) or ISTIO_MUTUAL
	// (mutual TLS with the workload identity, the server verified against
	// the mesh roots and its SPIFFE ID against subjectAltNames; no files).
	Mode string `json:"mode,omitempty"`
	// AutoMTLS (ISTIO_MUTUAL only) limits mutual TLS to the endpoints
	// whose tlsMode is istio and reaches the others in plain text: Istio's
	// automatic mutual TLS (transport_socket_matches on the endpoint's
	// tlsMode). Without it every endpoint gets mutual TLS (a
	// DestinationRule's ISTIO_MUTUAL).
	AutoMTLS bool `json:"autoMTLS,omitempty"`
	// CACertificates is a PEM file of the CAs that verify the server's
	// certificate (absolute path); empty: the system roots.
	CACertificates string `json:"caCertificates,omitempty"`
	// ClientCertificate and PrivateKey are PEM files (absolute paths) of the
	// certificate chain the proxy presents; MUTUAL only, and required there.
	ClientCertificate string `json:"clientCertificate,omitempty"`
	PrivateKey        string `json:"privateKey,omitempty"`
	// SNI is the server name sent in the ClientHello and the name the server
	// certificate is verified against. Default: the cluster's dns.name; a
	// cluster of static endpoints sends no SNI and verifies each endpoint's
	// IP address (the certificate needs it as an IP SAN) unless SNI or
	// SubjectAltNames is set.
	SNI string `json:"sni,omitempty"`
	// SubjectAltNames, when set, replace the host-name check: the server
	// certificate (still verified against the CAs) must carry one of these
	// names — a DNS name (the certificate's wildcards match), an IP address,
	// or a URI such as spiffe://cluster.local/ns/default/sa/api.
	SubjectAltNames []string `json:"subjectAltNames,omitempty"`
	// InsecureSkipVerify accepts any server certificate (logged as a
	// warning when the config loads). Not with caCertificates or
	// subjectAltNames, which it would silently ignore.
	InsecureSkipVerify bool `json:"insecureSkipVerify,omitempty"`
	// MinProtocolVersion is TLSV1_2 (default) or TLSV1_3.
	MinProtocolVersion string `json:"minProtocolVersion,omitempty"`
}

// TLS origination modes.
const (
	TLSDisable     = "DISABLE"
	TLSSimple      = "SIMPLE"
	TLSMutual      = "MUTUAL"
	TLSIstioMutual = "ISTIO_MUTUAL"
)

// LoadTLS checks cl.TLS, reading its files, and returns what a TLS client
// for the cluster needs, or nil for plain text (no tls block, or mode
// DISABLE). Every problem is returned, each naming its field (under field,
// e.g. "clusters[0].tls") and the bad value or path.
func (cl *Cluster) LoadTLS(field string) (*ClientTLS, []error) {
	t := cl.TLS
	if t == nil {
		return nil, nil
	}
	var errs []error
	bad := func(f, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s.%s: %s", field, f, fmt.Sprintf(format, a...)))
	}
	mode := t.Mode
	switch mode {
	case "", TLSDisable:
		mode = TLSDisable
	case TLSSimple, TLSMutual:
	case TLSIstioMutual:
		// Certificates and roots come from the workload identity (the
		// engine's mtls settings); files would be ignored.
		for f, set := range map[string]bool{"caCertificates": t.CACertificates != "", "clientCertificate": t.ClientCertificate != "",
			"privateKey": t.PrivateKey != "", "insecureSkipVerify": t.InsecureSkipVerify} {
			if set {
				bad(f, "is set but mode is ISTIO_MUTUAL (the workload certificate and the mesh roots are used)")
			}
		}
		for i, n := range t.SubjectAltNames {
			if !strings.HasPrefix(n, "spiffe://") {
				bad(fmt.Sprintf("subjectAltNames[%d]", i), "%q: ISTIO_MUTUAL verifies SPIFFE IDs (spiffe://...)", n)
			}
		}
		slices.SortFunc(errs, func(a, b error) int { return strings.Compare(a.Error(), b.Error()) })
		return nil, errs
	default:
		bad("mode", "%q must be one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL", t.Mode)
		return nil, errs
	}
	if t.AutoMTLS {
		bad("autoMTLS", "needs mode ISTIO_MUTUAL, not %s", mode)
	}
	if mode == TLSDisable {
		for f, set := range map[string]bool{"caCertificates": t.CACertificates != "", "clientCertificate": t.ClientCertificate != "",
			"privateKey": t.PrivateKey != "", "sni": t.SNI != "", "subjectAltNames": len(t.SubjectAltNames) > 0,
			"insecureSkipVerify": t.InsecureSkipVerify, "minProtocolVersion": t.MinProtocolVersion != ""} {
			if set {
				bad(f, "is set but mode is DISABLE (plain text); set mode SIMPLE or MUTUAL")
			}
		}
		slices.SortFunc(errs, func(a, b error) int { return strings.Compare(a.Error(), b.Error()) })
		return nil, errs
	}

	read := func(f, path string) []byte {
		if !filepath.IsAbs(path) {
			bad(f, "%q must be an absolute path", path)
			return nil
		}
		b, err := readPEMFile(path)
		if err != nil {
			bad(f, "reading %q: %v", path, err)
			return nil
		}
		return b
	}
	var roots *x509.CertPool
	if t.CACertificates != "" {
		if b := read("caCertificates", t.CACertificates); b != nil {
			certs, err := parsePEMCertificates(b)
			if err != nil {
				bad("caCertificates", "%q: %v", t.CACertificates, err)
			} else {
				roots = x509.NewCertPool()
				for _, c := range certs {
					roots.AddCert(c)
				}
			}
		}
	}
	var clientCerts []tls.Certificate
	if mode == TLSMutual {
		if t.ClientCertificate == "" {
			bad("clientCertificate", "is required for mode MUTUAL")
		}
		if t.PrivateKey == "" {
			bad("privateKey", "is required for mode MUTUAL")
		}
		if t.ClientCertificate != "" && t.PrivateKey != "" {
			certPEM := read("clientCertificate", t.ClientCertificate)
			keyPEM := read("privateKey", t.PrivateKey)
			if certPEM != nil {
				if _, err := parsePEMCertificates(certPEM); err != nil {
					bad("clientCertificate", "%q: %v", t.ClientCertificate, err)
					certPEM = nil
				}
			}
			if certPEM != nil && keyPEM != nil {
				pair, err := tls.X509KeyPair(certPEM, keyPEM)
				switch {
				case err != nil && strings.Contains(err.Error(), "does not match"):
					bad("privateKey", "%q does not match clientCertificate %q", t.PrivateKey, t.ClientCertificate)
				case err != nil:
					bad("privateKey", "%q: %s", t.PrivateKey, strings.TrimPrefix(err.Error(), "tls: "))
				default:
					clientCerts = []tls.Certificate{pair}
				}
			}
		}
	} else {
		if t.ClientCertificate != "" {
			bad("clientCertificate", "%q is only used with mode MUTUAL (mode is %s)", t.ClientCertificate, mode)
		}
		if t.PrivateKey != "" {
			bad("privateKey", "%q is only used with mode MUTUAL (mode is %s)", t.PrivateKey, mode)
		}
	}
	if t.SNI != "" {
		if _, err := netip.ParseAddr(t.SNI); err == nil {
			bad("sni", "%q is an IP address, which TLS does not send as SNI; use subjectAltNames to verify an IP", t.SNI)
		} else if strings.ContainsAny(t.SNI, " /:*\t\r\n") || strings.Trim(t.SNI, ".") == "" {
			bad("sni", "%q is not a DNS name", t.SNI)
		}
	}
	for i, n := range t.SubjectAltNames {
		if strings.TrimSpace(n) == "" || strings.ContainsAny(n, " \t\r\n") {
			bad(fmt.Sprintf("subjectAltNames[%d]", i), "%q is not a name", n)
		}
	}
	if t.InsecureSkipVerify {
		if t.CACertificates != "" {
			bad("insecureSkipVerify", "true ignores caCertificates %q; set one or the other", t.CACertificates)
		}
		if len(t.SubjectAltNames) > 0 {
			bad("insecureSkipVerify", "true ignores subjectAltNames; set one or the other")
		}
	}
	minVersion := uint16(tls.VersionTLS12)
	switch t.MinProtocolVersion {
	case "", "TLSV1_2":
	case "TLSV1_3":
		minVersion = tls.VersionTLS13
	case "TLSV1_0", "TLSV1_1":
		bad("minProtocolVersion", "%q is not supported (TLS 1.2 is the oldest version meshlet speaks)", t.MinProtocolVersion)
	default:
		bad("minProtocolVersion", "%q must be TLSV1_2 or TLSV1_3", t.MinProtocolVersion)
	}
	if len(errs) > 0 {
		return nil, errs
	}

	sni := t.SNI
	if sni == "" && cl.DNS != nil {
		sni = cl.DNS.Name
	}
	return &ClientTLS{Roots: roots, Certificates: clientCerts, ServerName: strings.TrimSuffix(sni, "."), MinVersion: minVersion,
		SubjectAltNames: slices.Clone(t.SubjectAltNames), InsecureSkipVerify: t.InsecureSkipVerify}, nil
}

// ClientTLS is a cluster's checked TLS origination settings with the files
// loaded (see Cluster.LoadTLS).
type ClientTLS struct {
	// Roots verify the server's chain; nil means the system roots.
	Roots *x509.CertPool
	// Certificates holds the client certificate (MUTUAL), else none.
	Certificates []tls.Certificate
	// ServerName is sent as SNI and verified; "" for a cluster of static
	// endpoints without sni (each endpoint's IP address is verified).
	ServerName string
	// MinVersion is the oldest TLS version spoken.
	MinVersion uint16
	// SubjectAltNames, when set, replace the host-name check.
	SubjectAltNames []string
	// InsecureSkipVerify accepts any server certificate.
	InsecureSkipVerify bool
}

// parsePEMCertificates returns every CERTIFICATE block of a PEM file; none
// is an error.
func parsePEMCertificates(b []byte) ([]*x509.Certificate, error) {
	certs, err := certpem.ParseCertificates(b)
	if err == nil && len(certs) == 0 {
		err = errors.New("no PEM CERTIFICATE block found")
	}
	return certs, err
}

// maxPEMFile bounds what is read of a certificate or key file.
const maxPEMFile = 1 << 20

// readPEMFile reads a regular file of at most maxPEMFile bytes (a device
// such as /dev/zero given by mistake must not hang the config load).
func readPEMFile(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		var pe *fs.PathError
		if errors.As(err, &pe) {
			err = pe.Err
		}
		return nil, err
	}
	defer f.Close()
	if st, err := f.Stat(); err != nil {
		return nil, err
	} else if !st.Mode().IsRegular() {
		return nil, fmt.Errorf("not a regular file (%s)", st.Mode().Type())
	}
	b, err := io.ReadAll(io.LimitReader(f, maxPEMFile+1))
	if err != nil {
		return nil, err
	}
	if len(b) > maxPEMFile {
		return nil, fmt.Errorf("larger than %d bytes", maxPEMFile)
	}
	return b, nil
}
