package l7

import (
	"net/http"

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
