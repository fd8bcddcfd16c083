package xds

import (
	"fmt"
	"slices"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	tcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	rawbufferv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/mtls"
)

// Mutual TLS on the wire (docs/xds.md, "Automatic mutual TLS" and "Peer
// authentication on the inbound listener").
const (
	transportSocketMatch = "envoy.transport_socket_match"
	socketTLS            = "envoy.transport_sockets.tls"
	socketRaw            = "envoy.transport_sockets.raw_buffer"
	listenerTLSInspector = "envoy.filters.listener.tls_inspector"
	// The SDS names of the workload certificate and the mesh roots: the
	// proxy serves both from the identity the agent hands it.
	sdsDefault = "default"
	sdsRootCA  = "ROOTCA"
)

func init() {
	for _, m := range []proto.Message{&rawbufferv3.RawBuffer{}, &tlsinspectorv3.TlsInspector{}, &tlsv3.DownstreamTlsContext{}} {
		anyTypes[typePrefix+string(m.ProtoReflect().Descriptor().FullName())] = true
	}
}

// endpointTLSMode returns the endpoint's tlsMode (metadata
// filter_metadata["envoy.transport_socket_match"].tlsMode).
func endpointTLSMode(lb *endpointv3.LbEndpoint) string {
	md := lb.GetMetadata().GetFilterMetadata()[transportSocketMatch]
	if v := md.GetFields()["tlsMode"].GetStringValue(); v == mtls.TLSModeIstio {
		return config.EndpointTLSIstio
	}
	return ""
}

// istioMutualFields are the UpstreamTlsContext fields of ISTIO_MUTUAL
// (relative to a transport_socket).
var istioMutualFields = []string{
	"typed_config.common_tls_context.tls_certificate_sds_secret_configs.name",
	"typed_config.common_tls_context.tls_certificate_sds_secret_configs.sds_config/*",
	"typed_config.common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names.san_type",
	"typed_config.common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names.matcher.exact",
	"typed_config.common_tls_context.combined_validation_context.validation_context_sds_secret_config.name",
	"typed_config.common_tls_context.combined_validation_context.validation_context_sds_secret_config.sds_config/*",
}

// isIstioMutual reports whether u takes its certificate from SDS (the
// workload identity) rather than files.
func isIstioMutual(u *tlsv3.UpstreamTlsContext) bool {
	return len(u.GetCommonTlsContext().GetTlsCertificateSdsSecretConfigs()) > 0
}

// decodeIstioMutual translates an SDS-based UpstreamTlsContext (field
// names the transport socket) into mode ISTIO_MUTUAL: the secrets must be
// the workload identity's (default, ROOTCA), the SANs URI exact matches.
func decodeIstioMutual(re *resourceError, field string, u *tlsv3.UpstreamTlsContext) *upstreamTLS {
	ctx := u.GetCommonTlsContext()
	t := &upstreamTLS{Mode: config.TLSIstioMutual, SNI: u.GetSni()}
	for i, s := range ctx.GetTlsCertificateSdsSecretConfigs() {
		if s.GetName() != sdsDefault || i > 0 {
			re.add("%s.typed_config.common_tls_context.tls_certificate_sds_secret_configs[%d].name: %q: only one, %q (the workload certificate), is supported", field, i, s.GetName(), sdsDefault)
		}
	}
	cvc := ctx.GetCombinedValidationContext()
	if n := cvc.GetValidationContextSdsSecretConfig().GetName(); n != sdsRootCA {
		re.add("%s.typed_config.common_tls_context.combined_validation_context.validation_context_sds_secret_config.name: %q: only %q (the mesh roots) is supported", field, n, sdsRootCA)
	}
	for i, san := range cvc.GetDefaultValidationContext().GetMatchTypedSubjectAltNames() {
		f := fmt.Sprintf("%s.typed_config.common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names[%d]", field, i)
		if san.GetSanType() != tlsv3.SubjectAltNameMatcher_URI || san.GetMatcher().GetExact() == "" {
			re.add("%s: a URI SAN with an exact matcher is required", f)
			continue
		}
		t.SubjectAltNames = append(t.SubjectAltNames, san.GetMatcher().GetExact())
	}
	switch v := ctx.GetTlsParams().GetTlsMinimumProtocolVersion(); v {
	case tlsv3.TlsParameters_TLS_AUTO, tlsv3.TlsParameters_TLSv1_2:
	default:
		re.add("%s.typed_config.common_tls_context.tls_params.tls_minimum_protocol_version: %s is not supported with ISTIO_MUTUAL", field, v)
	}
	return t
}

// decodeSocketMatches translates Istio's automatic mutual TLS: a match
// {tlsMode: istio} with an ISTIO_MUTUAL socket and a match {} with
// raw_buffer. Any other shape is refused naming the field.
func decodeSocketMatches(re *resourceError, ms []*clusterv3.Cluster_TransportSocketMatch) *upstreamTLS {
	var t *upstreamTLS
	plain := false
	for i, m := range ms {
		f := fmt.Sprintf("transport_socket_matches[%d]", i)
		fields := m.GetMatch().GetFields()
		ts := m.GetTransportSocket()
		switch {
		case len(fields) == 1 && fields["tlsMode"].GetStringValue() == mtls.TLSModeIstio:
			cfg, err := ts.GetTypedConfig().UnmarshalNew()
			u, ok := cfg.(*tlsv3.UpstreamTlsContext)
			if err != nil || !ok || !isIstioMutual(u) {
				re.add("%s.transport_socket: an UpstreamTlsContext with the workload certificate (SDS %q) is required", f, sdsDefault)
				continue
			}
			t = decodeIstioMutual(re, f+".transport_socket", u)
		case len(fields) == 0:
			cfg, err := ts.GetTypedConfig().UnmarshalNew()
			if _, ok := cfg.(*rawbufferv3.RawBuffer); err != nil || !ok {
				re.add("%s.transport_socket: the default match must be %s", f, socketRaw)
				continue
			}
			plain = true
		default:
			re.add("%s.match: only {tlsMode: istio} and {} are supported", f)
		}
	}
	if t == nil || !plain {
		if t != nil || plain {
			re.add("transport_socket_matches: want a {tlsMode: istio} match and a {} match (Istio's automatic mutual TLS)")
		}
		return nil
	}
	t.AutoMTLS = true
	return t
}

// chainPeer is what one inbound filter chain says about peer
// authentication.
type chainPeer struct {
	port      uint32 // destination_port (0: none)
	tls       bool   // transport_protocol "tls" with a DownstreamTlsContext
	plain     bool   // serves plain text (transport_protocol "raw_buffer" or none)
	blackhole bool   // its tcp_proxy goes to BlackHoleCluster (plain text refused)
	any       bool   // no transport_protocol: bytes pass as sent (DISABLE)
}

// peerOfChain checks the transport side of an inbound filter chain.
func peerOfChain(re *resourceError, field string, fc *listenerv3.FilterChain) chainPeer {
	m := fc.GetFilterChainMatch()
	cp := chainPeer{port: m.GetDestinationPort().GetValue()}
	for _, f := range fc.GetFilters() {
		if c, err := f.GetTypedConfig().UnmarshalNew(); err == nil {
			if tp, ok := c.(*tcpv3.TcpProxy); ok && tp.GetCluster() == blackholeCluster {
				cp.blackhole = true
			}
		}
	}
	switch m.GetTransportProtocol() {
	case "":
		cp.any, cp.plain = true, true
		if fc.GetTransportSocket() != nil {
			re.add("%s.transport_socket: only with filter_chain_match.transport_protocol \"tls\"", field)
		}
	case "raw_buffer":
		cp.plain = true
		if fc.GetTransportSocket() != nil {
			re.add("%s.transport_socket: not with transport_protocol raw_buffer", field)
		}
	case "tls":
		cp.tls = true
		for _, p := range m.GetApplicationProtocols() {
			if !slices.Contains(mtls.ServerProtocols, p) {
				re.add("%s.filter_chain_match.application_protocols: %q is not one of Istio's mutual TLS protocols %v", field, p, mtls.ServerProtocols)
			}
		}
		checkDownstreamTLS(re, field+".transport_socket", fc.GetTransportSocket())
	default:
		re.add("%s.filter_chain_match.transport_protocol: %q is not supported (tls, raw_buffer)", field, m.GetTransportProtocol())
	}
	return cp
}

// checkDownstreamTLS checks an inbound mutual TLS socket: client
// certificates required, the workload identity's SDS names.
func checkDownstreamTLS(re *resourceError, field string, ts *corev3.TransportSocket) {
	cfg, err := ts.GetTypedConfig().UnmarshalNew()
	d, ok := cfg.(*tlsv3.DownstreamTlsContext)
	if ts == nil || err != nil || !ok {
		re.add("%s: a DownstreamTlsContext is required on a tls chain", field)
		return
	}
	if !d.GetRequireClientCertificate().GetValue() {
		re.add("%s.typed_config.require_client_certificate: must be true (mutual TLS)", field)
	}
	ctx := d.GetCommonTlsContext()
	if s := ctx.GetTlsCertificateSdsSecretConfigs(); len(s) != 1 || s[0].GetName() != sdsDefault {
		re.add("%s.typed_config.common_tls_context.tls_certificate_sds_secret_configs: exactly one, %q (the workload certificate), is supported", field, sdsDefault)
	}
	if n := ctx.GetCombinedValidationContext().GetValidationContextSdsSecretConfig().GetName(); n != sdsRootCA {
		re.add("%s.typed_config.common_tls_context.combined_validation_context.validation_context_sds_secret_config.name: %q: only %q (the mesh roots) is supported", field, n, sdsRootCA)
	}
}

// inboundMTLS derives the PeerAuthentication mode of every port from the
// inbound listener's chains (cps; hasDefault: a default_filter_chain,
// which serves plain text): a port with a tls chain and a plain chain that
// is not a black hole is PERMISSIVE, a tls chain alone (or with a black
// hole) STRICT, no tls chain DISABLE. Ports without a chain of their own
// take the mode of the chains without destination_port and the default
// chain. nil: no chain has mutual TLS.
func inboundMTLS(cps []chainPeer, hasDefault bool) *config.InboundMTLS {
	type acc struct{ tls, plain bool }
	ports := map[uint32]*acc{}
	for _, cp := range cps {
		a := ports[cp.port]
		if a == nil {
			a = &acc{}
			ports[cp.port] = a
		}
		a.tls = a.tls || cp.tls
		a.plain = a.plain || cp.plain && !cp.blackhole
	}
	mode := func(a *acc) string {
		switch {
		case a == nil || !a.tls:
			return config.PeerDisable
		case a.plain:
			return config.PeerPermissive
		}
		return config.PeerStrict
	}
	d := ports[0]
	if d == nil {
		d = &acc{}
	}
	d.plain = d.plain || hasDefault
	out := &config.InboundMTLS{Mode: mode(d), Ports: map[uint16]string{}}
	anyTLS := d.tls
	for p, a := range ports {
		if p == 0 {
			continue
		}
		anyTLS = anyTLS || a.tls
		out.Ports[uint16(p)] = mode(a)
	}
	if !anyTLS {
		return nil
	}
	return out
}
