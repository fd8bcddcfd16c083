// Package certpem reads X.509 certificates from PEM data. It depends on the
// standard library only, so both the proxy (which must not link Kubernetes
// client libraries) and the webhook's certificate authority use it.
package certpem

import (
	"crypto/x509"
	"encoding/pem"
	"fmt"
)

// ParseCertificates returns every CERTIFICATE block of b, in order; other
// block types (keys) are skipped. A block that does not parse is an error
// naming its position (counting certificates from 1). Data without any
// certificate gives an empty list and no error: callers say what was
// missing.
func ParseCertificates(b []byte) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for {
		var block *pem.Block
		block, b = pem.Decode(b)
		if block == nil {
			break
		}
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", len(out)+1, err)
		}
		out = append(out, c)
	}
	return out, nil
}
