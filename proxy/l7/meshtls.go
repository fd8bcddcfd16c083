package l7

import (
	"crypto/tls"
	"net/http"
	"net/netip"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/mtls"
)

// setXFCC replaces any X-Forwarded-Client-Cert of an inbound request with
// the verified peer's (Istio's By, Hash, URI), or removes it on plain
// text: the application can trust the header.
func (p *Engine) setXFCC(r *http.Request) {
	delete(r.Header, mtls.XFCCHeader)
	if v := mtls.XFCC(p.identity.Identity(), r.TLS); v != "" {
		r.Header[mtls.XFCCHeader] = []string{v}
	}
}

// refusePlaintext reports whether an inbound request that arrived in plain
// text (cs nil) for dst must be refused under the table t: its port's
// PeerAuthentication is STRICT now, although its connection was accepted
// before an update under another mode (PERMISSIVE, DISABLE or none). A new
// plain-text connection to that port is refused at accept; one opened
// earlier must not keep being served because it was kept alive. The caller
// ends the connection without an answer (HTTP/2: the stream refused and
// GOAWAY), so the client sees what a new connection would, and the refusal
// counts as meshlet_mtls_inbound_connections_total{mode="STRICT",result="refused_plaintext"}.
func (p *Engine) refusePlaintext(t *table, dir l4.Direction, cs *tls.ConnectionState, dst netip.AddrPort) bool {
	if dir != l4.Inbound || cs != nil || t.peerAuth.ModeFor(dst.Port()) != config.PeerStrict {
		return false
	}
	p.inbound.CountRefusedPlaintext()
	p.log.Debug("inbound plain-text request refused: its connection predates STRICT on the port", "destination", dst.String())
	return true
}
