package translate

import (
	"fmt"
	"slices"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	rawbufferv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/webhook/inject"
)

// Istio's mutual TLS wire names (docs/xds.md, "Automatic mutual TLS" and
// "Peer authentication on the inbound listener").
const (
	// LabelTLSMode is the pod label the injector sets on meshed pods
	// (defined once, by the injector that writes it).
	LabelTLSMode = inject.LabelTLSMode
	// TLSModeIstio is its value on a meshed pod.
	TLSModeIstio = inject.TLSModeIstio
	// TransportSocketMatchKey is the endpoint metadata filter that carries
	// an endpoint's tlsMode, matched by a cluster's transport_socket_matches.
	TransportSocketMatchKey = "envoy.transport_socket_match"
	// SDSDefault and SDSRootCA name the workload certificate and the mesh
	// roots (Istio's SDS resource names); the meshlet proxy takes both
	// from the identity the agent hands it.
	SDSDefault = "default"
	SDSRootCA  = "ROOTCA"

	socketRaw         = "envoy.transport_sockets.raw_buffer"
	listenerTLSInspec = "envoy.filters.listener.tls_inspector"
	matchIstio        = "tlsMode-istio"
	matchDisabled     = "tlsMode-disabled"
)

// mtlsALPN are the ALPN values a client sidecar offers on ISTIO_MUTUAL
// connections (the proxy picks the protocol-specific one per connection).
var mtlsALPN = []string{"istio-peer-exchange", "istio"}

// inboundMTLSALPN are the ALPN values an inbound mutual TLS chain matches.
var inboundMTLSALPN = []string{"istio-peer-exchange", "istio", "istio-http/1.0", "istio-http/1.1", "istio-h2"}

// endpointMetadata adds the endpoint's tlsMode for transport_socket_matches.
func endpointTLSMode(md *corev3.Metadata, e endpoint) {
	if e.labels[LabelTLSMode] != TLSModeIstio {
		return
	}
	md.FilterMetadata[TransportSocketMatchKey] = &structpb.Struct{Fields: map[string]*structpb.Value{
		"tlsMode": structpb.NewStringValue(TLSModeIstio)}}
}

// spiffeID is the SPIFFE ID of service account sa in ns.
func (m *Mesh) spiffeID(ns, sa string) string {
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", m.trustDomain, ns, sa)
}

// serviceSANs are the SPIFFE IDs of the service accounts the service's
// meshed pods (label security.istio.io/tlsMode=istio) run as, sorted: the
// identities a client accepts from it (none: any identity of the mesh
// roots).
func (m *Mesh) serviceSANs(s *service) []string {
	var out []string
	for _, eps := range s.endpoints {
		for _, e := range eps {
			if e.sa != "" && e.labels[LabelTLSMode] == TLSModeIstio {
				out = append(out, m.spiffeID(e.namespace, e.sa))
			}
		}
	}
	slices.Sort(out)
	return slices.Compact(out)
}

func sdsConfig(name string) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: adsSource()}
}

// istioMutualSocket is the UpstreamTlsContext of ISTIO_MUTUAL: the workload
// certificate and the mesh roots by SDS name, the destination's SPIFFE IDs,
// Istio's SNI outbound_.PORT_._.HOST.
func istioMutualSocket(sans []string, port uint32, host string) *corev3.TransportSocket {
	vc := &tlsv3.CertificateValidationContext{}
	for _, san := range sans {
		vc.MatchTypedSubjectAltNames = append(vc.MatchTypedSubjectAltNames, &tlsv3.SubjectAltNameMatcher{SanType: tlsv3.SubjectAltNameMatcher_URI,
			Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: san}}})
	}
	ctx := &tlsv3.UpstreamTlsContext{Sni: fmt.Sprintf("outbound_.%d_._.%s", port, host), CommonTlsContext: &tlsv3.CommonTlsContext{
		AlpnProtocols:                  mtlsALPN,
		TlsParams:                      &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2},
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{sdsConfig(SDSDefault)},
		ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
			DefaultValidationContext:         vc,
			ValidationContextSdsSecretConfig: sdsConfig(SDSRootCA)}},
	}}
	return &corev3.TransportSocket{Name: socketTLS, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(ctx)}}
}

// autoMTLSMatches are Istio's automatic mutual TLS: endpoints whose
// metadata says tlsMode istio get ts, the others plain text.
func autoMTLSMatches(ts *corev3.TransportSocket) []*clusterv3.Cluster_TransportSocketMatch {
	return []*clusterv3.Cluster_TransportSocketMatch{
		{Name: matchIstio, Match: &structpb.Struct{Fields: map[string]*structpb.Value{"tlsMode": structpb.NewStringValue(TLSModeIstio)}}, TransportSocket: ts},
		{Name: matchDisabled, Match: &structpb.Struct{}, TransportSocket: &corev3.TransportSocket{Name: socketRaw,
			ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&rawbufferv3.RawBuffer{})}}},
	}
}

// inboundTLSSocket is the DownstreamTlsContext of an inbound mutual TLS
// chain: the workload certificate, client certificates required and
// verified against the mesh roots.
func inboundTLSSocket() *corev3.TransportSocket {
	ctx := &tlsv3.DownstreamTlsContext{RequireClientCertificate: wrapperspb.Bool(true), CommonTlsContext: &tlsv3.CommonTlsContext{
		AlpnProtocols:                  []string{"h2", "http/1.1"},
		TlsParams:                      &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2},
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{sdsConfig(SDSDefault)},
		ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
			DefaultValidationContext:         &tlsv3.CertificateValidationContext{},
			ValidationContextSdsSecretConfig: sdsConfig(SDSRootCA)}},
	}}
	return &corev3.TransportSocket{Name: socketTLS, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(ctx)}}
}

func tlsInspector() *listenerv3.ListenerFilter {
	return &listenerv3.ListenerFilter{Name: listenerTLSInspec,
		ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&tlsinspectorv3.TlsInspector{})}}
}

// peerChains shapes the filter chains of one inbound port (0: the
// passthrough of ports no Service names) by its PeerAuthentication mode:
// plain is the chain as it serves plain text. STRICT: one mutual TLS chain,
// and (for a port, under a workload mode that lets plain text reach the
// default chain) a plain-text chain to BlackHoleCluster so plain text is
// closed; PERMISSIVE: the mutual TLS chain and the plain one; DISABLE: the
// plain one without transport_protocol.
func peerChains(plain *listenerv3.FilterChain, mode, dflt MTLSMode) []*listenerv3.FilterChain {
	if mode == MTLSDisable {
		return []*listenerv3.FilterChain{plain}
	}
	m := plain.GetFilterChainMatch()
	tlsMatch := &listenerv3.FilterChainMatch{DestinationPort: m.GetDestinationPort(), TransportProtocol: "tls", ApplicationProtocols: inboundMTLSALPN}
	tc := &listenerv3.FilterChain{Name: plain.Name + "-mtls", FilterChainMatch: tlsMatch, Filters: plain.Filters, TransportSocket: inboundTLSSocket()}
	rawMatch := &listenerv3.FilterChainMatch{DestinationPort: m.GetDestinationPort(), TransportProtocol: "raw_buffer"}
	switch {
	case mode == MTLSPermissive:
		return []*listenerv3.FilterChain{tc, {Name: plain.Name, FilterChainMatch: rawMatch, Filters: plain.Filters}}
	case m.GetDestinationPort() != nil && dflt != MTLSStrict:
		return []*listenerv3.FilterChain{tc, {Name: plain.Name + "-plaintext", FilterChainMatch: rawMatch,
			Filters: []*listenerv3.Filter{tcpProxyFilter(BlackHoleCluster, BlackHoleCluster)}}}
	default:
		return []*listenerv3.FilterChain{tc}
	}
}

// applyPeerAuthentication reshapes the inbound listener l (its chains
// built for plain text) by sec's modes.
func applyPeerAuthentication(l *listenerv3.Listener, sec *Security) {
	dflt := sec.Mode
	if dflt == "" {
		dflt = MTLSPermissive
	}
	var chains []*listenerv3.FilterChain
	for _, fc := range l.FilterChains {
		chains = append(chains, peerChains(fc, cmpMode(sec.ModeFor(fc.GetFilterChainMatch().GetDestinationPort().GetValue()), dflt), dflt)...)
	}
	if dflt != MTLSDisable {
		pass := peerChains(&listenerv3.FilterChain{Name: l.DefaultFilterChain.Name, Filters: l.DefaultFilterChain.Filters}, dflt, dflt)
		chains = append(chains, pass[0])
		if dflt == MTLSStrict {
			l.DefaultFilterChain = nil // plain text to an unnamed port matches nothing: closed
		}
	}
	l.FilterChains = chains
	l.ListenerFilters = []*listenerv3.ListenerFilter{tlsInspector()}
}

func cmpMode(m, dflt MTLSMode) MTLSMode {
	if m == "" {
		return dflt
	}
	return m
}
