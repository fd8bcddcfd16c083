package xds

import (
	"crypto/tls"
	"net/http"
	"net/netip"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rbactcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"

	"github.com/meshlet/meshlet/proxy/rbac"
)

// The RBAC filter names (docs/xds.md, "Security: RBAC and peer
// authentication").
const (
	filterHTTPRBAC    = "envoy.filters.http.rbac"
	filterNetworkRBAC = "envoy.filters.network.rbac"
)

// inboundAuthz is the compiled authorization of the inbound listener: the
// rules of each filter chain by destination port, and of the default chain.
type inboundAuthz struct {
	// http holds the HTTP RBAC rules of the ports with an HTTP chain (a nil
	// engine allows all); tcp the network rules of the ports with a TCP
	// chain; dflt the default chain's network rules.
	http map[uint32]*rbac.Engine
	tcp  map[uint32]*rbac.Engine
	dflt *rbac.Engine
}

// empty reports whether no chain has any rule.
func (a *inboundAuthz) empty() bool {
	if a == nil {
		return true
	}
	for _, e := range a.http {
		if !e.Empty() {
			return false
		}
	}
	for _, e := range a.tcp {
		if !e.Empty() {
			return false
		}
	}
	return a.dflt.Empty()
}

// authorize decides an inbound request for dst: by the HTTP rules of its
// port's HTTP chain; HTTP on a port whose chain is TCP (or that has no
// chain) by that chain's connection rules, as Envoy would.
func (a *inboundAuthz) authorize(r *http.Request, dst netip.AddrPort) (bool, string) {
	if e, ok := a.http[uint32(dst.Port())]; ok {
		attrs := rbac.HTTPAttributes(r, dst)
		d := e.Evaluate(&attrs)
		return d.Allowed, d.Policy
	}
	src, _ := netip.ParseAddrPort(r.RemoteAddr)
	return a.authorizeConn(src, dst, r.TLS)
}

// authorizeConn decides an inbound connection by the network rules of its
// destination port's chain, else the default chain's. A port with an HTTP
// chain is decided per request (authorize).
func (a *inboundAuthz) authorizeConn(src, dst netip.AddrPort, cs *tls.ConnectionState) (bool, string) {
	port := uint32(dst.Port())
	if _, ok := a.http[port]; ok {
		return true, ""
	}
	e, ok := a.tcp[port]
	if !ok {
		e = a.dflt
	}
	attrs := rbac.ConnAttributes(src, dst, cs)
	d := e.Evaluate(&attrs)
	return d.Allowed, d.Policy
}

// chainAuthz compiles the RBAC filters of one filter chain of the inbound
// listener into a (field names the chain). A compile error is added to re
// naming the filter.
func chainAuthz(re *resourceError, a *inboundAuthz, field string, fc *listenerv3.FilterChain, isDefault bool) {
	var network []*rbactcpv3.RBAC
	var httpRules []*rbachttpv3.RBAC
	isHTTP := false
	for j, f := range fc.GetFilters() {
		cfg, err := f.GetTypedConfig().UnmarshalNew()
		if err != nil {
			continue // reported by the schema walk
		}
		switch c := cfg.(type) {
		case *rbactcpv3.RBAC:
			network = append(network, c)
		case *hcmv3.HttpConnectionManager:
			isHTTP = true
			for k, hf := range c.GetHttpFilters() {
				if hf.GetName() != filterHTTPRBAC {
					continue
				}
				hc, err := hf.GetTypedConfig().UnmarshalNew()
				r, ok := hc.(*rbachttpv3.RBAC)
				if err != nil || !ok {
					re.add("%s.filters[%d].typed_config.http_filters[%d].typed_config: want %s", field, j, k, "envoy.extensions.filters.http.rbac.v3.RBAC")
					continue
				}
				httpRules = append(httpRules, r)
			}
		}
	}
	port := fc.GetFilterChainMatch().GetDestinationPort().GetValue()
	switch {
	case isHTTP && len(network) > 0:
		re.add("%s: %s with an HTTP connection manager is not supported (use %s)", field, filterNetworkRBAC, filterHTTPRBAC)
	case isHTTP:
		e, err := rbac.CompileHTTP(httpRules...)
		if err != nil {
			re.add("%s: %s: %v", field, filterHTTPRBAC, err)
			return
		}
		if isDefault {
			re.add("%s: an HTTP default chain is not supported on the inbound listener", field)
			return
		}
		a.http[port] = e
	default:
		e, err := rbac.CompileNetwork(network...)
		if err != nil {
			re.add("%s: %s: %v", field, filterNetworkRBAC, err)
			return
		}
		if isDefault {
			a.dflt = e
		} else {
			a.tcp[port] = e
		}
	}
}

// rbacFilterOutbound reports an RBAC filter outside the inbound listener:
// the proxy enforces authorization on inbound traffic only, and leaving a
// rule out silently would be an open door.
func rbacFilterOutbound(re *resourceError, field, name string) {
	re.add("%s.name: %q is only supported on the inbound listener", field, name)
}
