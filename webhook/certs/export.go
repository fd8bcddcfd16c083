package certs

import (
	"crypto/ecdsa"
	"crypto/x509"
	"math/big"
	"time"
)

// The helpers below are the PEM and certificate building blocks other
// certificate issuers of meshlet (the mesh CA in webhook/ca) share with the
// webhook's own, so there is one encoding of keys, bundles and serials.

// ParseAuthority reads a CA from the first certificate of bundle and its
// private key, checking that the key belongs to that certificate and that the
// certificate is a CA.
func ParseAuthority(bundle, keyPEM []byte) (*Authority, error) {
	return parseAuthority(bundle, keyPEM)
}

// EncodeCertificates writes certificates as one PEM bundle, in order.
func EncodeCertificates(certs []*x509.Certificate) []byte { return encodeBundle(certs) }

// EncodeKey writes an ECDSA private key as an "EC PRIVATE KEY" PEM block.
func EncodeKey(key *ecdsa.PrivateKey) ([]byte, error) { return encodeKey(key) }

// NewSerial returns a random 127-bit certificate serial number.
func NewSerial() (*big.Int, error) { return randomSerial() }

// Backdate is how far before now a certificate of lifetime validity starts,
// so a peer whose clock is slightly behind accepts it at once: five minutes,
// or a tenth of the validity for short-lived certificates.
func Backdate(validity time.Duration) time.Duration { return backdate(validity) }
