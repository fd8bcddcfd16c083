package rbac

import (
	"crypto/tls"
	"net"
	"net/http"
	"net/netip"
)

// PeerPrincipal returns the principal of a TLS connection: the first
// spiffe:// URI SAN of the peer's verified certificate, or "" when the peer
// sent none, it was not verified, or the connection is not TLS.
func PeerPrincipal(cs *tls.ConnectionState) string {
	if cs == nil || len(cs.VerifiedChains) == 0 || len(cs.PeerCertificates) == 0 {
		return ""
	}
	for _, u := range cs.PeerCertificates[0].URIs {
		if u.Scheme == "spiffe" {
			return u.String()
		}
	}
	return ""
}

// HTTPAttributes returns the attributes of an inbound request r that
// arrived for the original destination dst. RemoteIP is left to the caller
// (it depends on how many X-Forwarded-For hops are trusted).
func HTTPAttributes(r *http.Request, dst netip.AddrPort) Attributes {
	a := Attributes{
		Principal:       PeerPrincipal(r.TLS),
		DestinationIP:   dst.Addr().Unmap(),
		DestinationPort: uint32(dst.Port()),
		Host:            r.Host,
		Method:          r.Method,
		Path:            r.URL.RequestURI(),
		Headers:         r.Header,
	}
	if r.TLS != nil {
		a.ServerName = r.TLS.ServerName
	}
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
		a.SourceIP = ap.Addr().Unmap()
	} else if h, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		a.SourceIP, _ = netip.ParseAddr(h)
	}
	return a
}

// ConnAttributes returns the attributes of an inbound TCP connection from
// src to the original destination dst; cs is its TLS state (nil: plain
// text).
func ConnAttributes(src, dst netip.AddrPort, cs *tls.ConnectionState) Attributes {
	a := Attributes{
		Principal:       PeerPrincipal(cs),
		SourceIP:        src.Addr().Unmap(),
		DestinationIP:   dst.Addr().Unmap(),
		DestinationPort: uint32(dst.Port()),
	}
	if cs != nil {
		a.ServerName = cs.ServerName
	}
	return a
}
