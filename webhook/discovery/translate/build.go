package translate

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	faultcommonv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/common/fault/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	previoushostsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	networking "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	"k8s.io/apimachinery/pkg/labels"

	"github.com/meshlet/meshlet/internal/meshports"
)

// Resources are the Envoy resources of one proxy, each list sorted by name.
type Resources struct {
	Listeners []*listenerv3.Listener
	Routes    []*routev3.RouteConfiguration
	Clusters  []*clusterv3.Cluster
	Endpoints []*endpointv3.ClusterLoadAssignment
}

// ByType is r keyed by xDS type URL, the shape go-control-plane's
// snapshots take.
func (r *Resources) ByType() map[string][]types.Resource {
	out := map[string][]types.Resource{}
	for _, c := range r.Clusters {
		out[resourcev3.ClusterType] = append(out[resourcev3.ClusterType], c)
	}
	for _, e := range r.Endpoints {
		out[resourcev3.EndpointType] = append(out[resourcev3.EndpointType], e)
	}
	for _, l := range r.Listeners {
		out[resourcev3.ListenerType] = append(out[resourcev3.ListenerType], l)
	}
	for _, rc := range r.Routes {
		out[resourcev3.RouteType] = append(out[resourcev3.RouteType], rc)
	}
	return out
}

// Well-known names (docs/xds.md).
const (
	PassthroughCluster        = "PassthroughCluster"
	BlackHoleCluster          = "BlackHoleCluster"
	InboundPassthroughCluster = "InboundPassthroughCluster"
	VirtualOutbound           = "virtualOutbound"
	VirtualInbound            = "virtualInbound"
	OutboundPort              = meshports.Outbound
	InboundPort               = meshports.Inbound

	filterHCM      = "envoy.filters.network.http_connection_manager"
	filterTCPProxy = "envoy.filters.network.tcp_proxy"
	filterFault    = "envoy.filters.http.fault"
	filterRouter   = "envoy.filters.http.router"
	socketTLS      = "envoy.transport_sockets.tls"
	httpOptionsKey = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"
	systemCABundle = "/etc/ssl/certs/ca-certificates.crt"
)

// Istio's defaults (docs/xds.md).
const (
	defaultRetryOn       = "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes"
	defaultRetryAttempts = 2
	unlimited            = 4294967295
)

// ClusterName is Istio's outbound cluster name.
func ClusterName(port uint32, subset, host string) string {
	return fmt.Sprintf("outbound|%d|%s|%s", port, subset, host)
}

// InboundClusterName is Istio's inbound cluster name.
func InboundClusterName(port uint32) string { return fmt.Sprintf("inbound|%d||", port) }

type builder struct {
	m        *Mesh
	p        *Proxy
	grpc     bool
	sidecar  *networkingv1.Sidecar
	clusters map[string]*clusterv3.Cluster
	cla      map[string]*endpointv3.ClusterLoadAssignment
}

// ForProxy builds the resources of one proxy.
func (m *Mesh) ForProxy(p Proxy) *Resources {
	p.Labels = m.proxyLabels(&p)
	b := &builder{m: m, p: &p, grpc: p.Generator == GeneratorGRPC, sidecar: m.sidecarFor(&p),
		clusters: map[string]*clusterv3.Cluster{}, cla: map[string]*endpointv3.ClusterLoadAssignment{}}
	var visibleSvcs []*service
	for _, s := range m.ordered {
		if visible(b.sidecar, s, p.Namespace) {
			visibleSvcs = append(visibleSvcs, s)
		}
	}
	out := &Resources{}
	httpPorts := map[uint32][]*service{}
	for _, s := range visibleSvcs {
		for _, sp := range s.ports {
			b.serviceClusters(s, sp)
			if sp.protocol != protoTCP {
				httpPorts[sp.number] = append(httpPorts[sp.number], s)
			} else if !b.grpc {
				for _, vip := range s.addresses {
					out.Listeners = append(out.Listeners, tcpListener(vip, sp.number, ClusterName(sp.number, "", s.host)))
				}
			}
		}
	}
	for _, port := range slices.Sorted(maps.Keys(httpPorts)) {
		if b.grpc {
			for _, s := range httpPorts[port] {
				name := s.host + ":" + strconv.Itoa(int(port))
				rc := &routev3.RouteConfiguration{Name: name, VirtualHosts: []*routev3.VirtualHost{b.virtualHost(s, port)}}
				out.Routes = append(out.Routes, rc)
				for _, ln := range b.grpcListenerNames(s, port) {
					out.Listeners = append(out.Listeners, apiListener(ln, name))
				}
			}
			continue
		}
		rc := &routev3.RouteConfiguration{Name: strconv.Itoa(int(port)), ValidateClusters: wrapperspb.Bool(false)}
		for _, s := range httpPorts[port] {
			rc.VirtualHosts = append(rc.VirtualHosts, b.virtualHost(s, port))
		}
		rc.VirtualHosts = append(rc.VirtualHosts, b.allowAny())
		out.Routes = append(out.Routes, rc)
		out.Listeners = append(out.Listeners, httpListener(port))
	}
	if !b.grpc {
		b.passthroughClusters()
		out.Listeners = append(out.Listeners, b.outboundListener())
		out.Listeners = append(out.Listeners, b.inboundListener(visibleSvcs))
	}
	for _, name := range slices.Sorted(maps.Keys(b.clusters)) {
		out.Clusters = append(out.Clusters, b.clusters[name])
	}
	for _, name := range slices.Sorted(maps.Keys(b.cla)) {
		out.Endpoints = append(out.Endpoints, b.cla[name])
	}
	slices.SortFunc(out.Listeners, func(a, b *listenerv3.Listener) int { return strings.Compare(a.Name, b.Name) })
	slices.SortFunc(out.Routes, func(a, b *routev3.RouteConfiguration) int { return strings.Compare(a.Name, b.Name) })
	return out
}

func (m *Mesh) proxyLabels(p *Proxy) map[string]string {
	if pod := m.pods[p.Namespace+"/"+p.Name]; pod != nil && len(pod.Labels) > 0 {
		return pod.Labels
	}
	return p.Labels
}

// Key returns a string that is equal for two proxies exactly when ForProxy
// builds the same resources for them: the output depends on the proxy's
// namespace, generator, the labels some selector of the mesh reads, and
// the inbound ports Services send to its IP, not on its name or other
// labels (pod-template-hash, version, ...). Callers build once per key.
func (m *Mesh) Key(p Proxy) string {
	var sb strings.Builder
	sb.WriteString(p.Namespace)
	sb.WriteByte(0)
	sb.WriteString(p.Generator)
	lbls := m.proxyLabels(&p)
	for _, k := range slices.Sorted(maps.Keys(lbls)) {
		if !m.labelKeys[k] {
			continue
		}
		fmt.Fprintf(&sb, "\x00%s=%s", k, lbls[k])
	}
	sb.WriteByte(1)
	in := m.inbound[p.IP]
	for _, port := range slices.Sorted(maps.Keys(in)) {
		fmt.Fprintf(&sb, "%d/%s,", port, in[port])
	}
	return sb.String()
}

func (b *builder) registryOnly() bool {
	return b.sidecar != nil && b.sidecar.Spec.GetOutboundTrafficPolicy().GetMode() == networking.OutboundTrafficPolicy_REGISTRY_ONLY
}

func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(fmt.Sprintf("marshaling %T: %v", m, err)) // only our own well-formed messages get here
	}
	return a
}

func adsSource() *corev3.ConfigSource {
	return &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
		ResourceApiVersion: corev3.ApiVersion_V3}
}

func sockAddr(ip string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}}
}

func httpFilters() []*hcmv3.HttpFilter {
	return []*hcmv3.HttpFilter{
		{Name: filterFault, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(&faultv3.HTTPFault{})}},
		{Name: filterRouter, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(&routerv3.Router{})}},
	}
}

func hcmFilter(h *hcmv3.HttpConnectionManager) *listenerv3.Filter {
	return &listenerv3.Filter{Name: filterHCM, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(h)}}
}

func tcpProxyFilter(stat, cluster string) *listenerv3.Filter {
	return &listenerv3.Filter{Name: filterTCPProxy, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(
		&tcpproxyv3.TcpProxy{StatPrefix: stat, ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster}})}}
}

func httpListener(port uint32) *listenerv3.Listener {
	name := strconv.Itoa(int(port))
	return &listenerv3.Listener{
		Name: "0.0.0.0_" + name, Address: sockAddr("0.0.0.0", port), BindToPort: wrapperspb.Bool(false),
		TrafficDirection: corev3.TrafficDirection_OUTBOUND,
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{hcmFilter(&hcmv3.HttpConnectionManager{
			StatPrefix: "outbound_0.0.0.0_" + name, CodecType: hcmv3.HttpConnectionManager_AUTO,
			RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{ConfigSource: adsSource(), RouteConfigName: name}},
			HttpFilters:    httpFilters(),
		})}}},
	}
}

func tcpListener(vip string, port uint32, cluster string) *listenerv3.Listener {
	return &listenerv3.Listener{
		Name: fmt.Sprintf("%s_%d", vip, port), Address: sockAddr(vip, port), BindToPort: wrapperspb.Bool(false),
		TrafficDirection: corev3.TrafficDirection_OUTBOUND,
		FilterChains:     []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{tcpProxyFilter(cluster, cluster)}}},
	}
}

func apiListener(name, route string) *listenerv3.Listener {
	return &listenerv3.Listener{Name: name, ApiListener: &listenerv3.ApiListener{ApiListener: mustAny(&hcmv3.HttpConnectionManager{
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{ConfigSource: adsSource(), RouteConfigName: route}},
		HttpFilters:    httpFilters(),
	})}}
}

func (b *builder) grpcListenerNames(s *service, port uint32) []string {
	p := ":" + strconv.Itoa(int(port))
	names := []string{s.host + p}
	if s.kube {
		names = append(names, s.name+"."+s.namespace+p, s.name+"."+s.namespace+".svc"+p)
		if s.namespace == b.p.Namespace {
			names = append(names, s.name+p)
		}
	}
	return names
}

func (b *builder) outboundListener() *listenerv3.Listener {
	target := PassthroughCluster
	if b.registryOnly() {
		target = BlackHoleCluster
	}
	return &listenerv3.Listener{
		Name: VirtualOutbound, Address: sockAddr("0.0.0.0", OutboundPort), UseOriginalDst: wrapperspb.Bool(true),
		TrafficDirection:   corev3.TrafficDirection_OUTBOUND,
		DefaultFilterChain: &listenerv3.FilterChain{Name: target, Filters: []*listenerv3.Filter{tcpProxyFilter(target, target)}},
	}
}

// inboundListener has one filter chain per port of the proxy's own pod that
// a visible Service sends traffic to.
func (b *builder) inboundListener(svcs []*service) *listenerv3.Listener {
	ports := b.m.inbound[b.p.IP]
	_ = svcs
	sec := b.m.security.ForProxy(*b.p)
	l := &listenerv3.Listener{
		Name: VirtualInbound, Address: sockAddr("0.0.0.0", InboundPort), UseOriginalDst: wrapperspb.Bool(true),
		TrafficDirection: corev3.TrafficDirection_INBOUND,
		DefaultFilterChain: &listenerv3.FilterChain{Name: InboundPassthroughCluster,
			Filters: append(sec.NetworkFilters(), tcpProxyFilter(InboundPassthroughCluster, InboundPassthroughCluster))},
	}
	for _, port := range slices.Sorted(maps.Keys(ports)) {
		cl := InboundClusterName(port)
		b.clusters[cl] = &clusterv3.Cluster{Name: cl, ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
			LbPolicy: clusterv3.Cluster_CLUSTER_PROVIDED, ConnectTimeout: durationpb.New(10 * time.Second)}
		fc := &listenerv3.FilterChain{Name: cl, FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(port)}}
		if ports[port] == protoTCP {
			fc.Filters = append(sec.NetworkFilters(), tcpProxyFilter(cl, cl))
		} else {
			fc.Filters = []*listenerv3.Filter{hcmFilter(&hcmv3.HttpConnectionManager{
				StatPrefix: cl, CodecType: hcmv3.HttpConnectionManager_AUTO,
				RouteSpecifier: &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: &routev3.RouteConfiguration{
					Name: cl, VirtualHosts: []*routev3.VirtualHost{{Name: fmt.Sprintf("inbound|http|%d", port), Domains: []string{"*"},
						Routes: []*routev3.Route{{Name: "default", Match: prefixMatch("/"), Action: &routev3.Route_Route{Route: &routev3.RouteAction{
							ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cl}, Timeout: durationpb.New(0)}}}}}}}},
				HttpFilters: append(sec.HTTPFilters(), httpFilters()...),
			})}
		}
		l.FilterChains = append(l.FilterChains, fc)
	}
	applyPeerAuthentication(l, sec)
	return l
}

func prefixMatch(p string) *routev3.RouteMatch {
	return &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: p}}
}

func (b *builder) passthroughClusters() {
	for _, name := range []string{PassthroughCluster, InboundPassthroughCluster} {
		b.clusters[name] = &clusterv3.Cluster{Name: name, ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
			LbPolicy: clusterv3.Cluster_CLUSTER_PROVIDED, ConnectTimeout: durationpb.New(10 * time.Second)}
	}
	b.clusters[BlackHoleCluster] = &clusterv3.Cluster{Name: BlackHoleCluster, ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		ConnectTimeout: durationpb.New(10 * time.Second), LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: BlackHoleCluster}}
}

func (b *builder) allowAny() *routev3.VirtualHost {
	r := &routev3.Route{Name: "allow_any", Match: prefixMatch("/")}
	if b.registryOnly() {
		r.Name = "block_all"
		r.Action = &routev3.Route_DirectResponse{DirectResponse: &routev3.DirectResponseAction{Status: 502}}
	} else {
		r.Action = &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: PassthroughCluster},
			Timeout: durationpb.New(0)}}
	}
	return &routev3.VirtualHost{Name: "allow_any", Domains: []string{"*"}, Routes: []*routev3.Route{r}}
}

// domains lists every name a client of the proxy's namespace may use for s.
func (b *builder) domains(s *service, port uint32) []string {
	names := []string{s.host}
	if s.kube {
		if s.namespace == b.p.Namespace {
			names = append(names, s.name)
		}
		names = append(names, s.name+"."+s.namespace, s.name+"."+s.namespace+".svc")
	}
	names = append(names, s.addresses...)
	p := ":" + strconv.Itoa(int(port))
	var out []string
	for _, n := range names {
		out = append(out, n, n+p)
	}
	return out
}

func (b *builder) virtualHost(s *service, port uint32) *routev3.VirtualHost {
	vh := &routev3.VirtualHost{Name: s.host + ":" + strconv.Itoa(int(port)), Domains: b.domains(s, port)}
	if bv := b.m.vs[s.host]; bv != nil {
		vh.Routes = b.vsRoutes(bv.vs, s, port)
	}
	if len(vh.Routes) == 0 {
		cl := ClusterName(port, "", s.host)
		vh.Routes = []*routev3.Route{{Name: "default", Match: prefixMatch("/"), Action: &routev3.Route_Route{Route: &routev3.RouteAction{
			ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cl}, RetryPolicy: b.retryPolicy(nil), Timeout: b.timeout(nil),
			MaxStreamDuration: b.maxStream(nil)}}}}
	}
	return vh
}

func (b *builder) timeout(d *durationpb.Duration) *durationpb.Duration {
	if b.grpc {
		return nil
	}
	return cmp.Or(d, durationpb.New(0))
}

func (b *builder) maxStream(d *durationpb.Duration) *routev3.RouteAction_MaxStreamDuration {
	if !b.grpc || d == nil {
		return nil
	}
	return &routev3.RouteAction_MaxStreamDuration{MaxStreamDuration: d}
}

func vsConfigMeta(vs *networkingv1.VirtualService) *corev3.Metadata {
	return &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{"istio": {Fields: map[string]*structpb.Value{
		"config": structpb.NewStringValue(fmt.Sprintf("/apis/networking.istio.io/v1/namespaces/%s/virtual-service/%s", vs.Namespace, vs.Name)),
	}}}}
}

func (b *builder) vsRoutes(vs *networkingv1.VirtualService, s *service, port uint32) []*routev3.Route {
	var out []*routev3.Route
	for i, h := range vs.Spec.Http {
		var matches []*networking.HTTPMatchRequest
		if len(h.Match) == 0 {
			matches = []*networking.HTTPMatchRequest{nil}
		}
		for _, m := range h.Match {
			if b.matchApplies(m, port) {
				matches = append(matches, m)
			}
		}
		if len(matches) == 0 {
			continue
		}
		name := cmp.Or(h.Name, fmt.Sprintf("%s.%s.%d", vs.Namespace, vs.Name, i))
		for _, m := range matches {
			r := &routev3.Route{Name: name, Match: routeMatch(m), Metadata: vsConfigMeta(vs)}
			b.routeAction(r, h, s, port, vs.Namespace)
			out = append(out, r)
		}
	}
	return out
}

func (b *builder) matchApplies(m *networking.HTTPMatchRequest, port uint32) bool {
	if m.Port != 0 && m.Port != port {
		return false
	}
	if len(m.Gateways) > 0 && !slices.Contains(m.Gateways, "mesh") {
		return false
	}
	if m.SourceNamespace != "" && m.SourceNamespace != b.p.Namespace {
		return false
	}
	if len(m.SourceLabels) > 0 && !labels.SelectorFromSet(m.SourceLabels).Matches(labels.Set(b.p.Labels)) {
		return false
	}
	return true
}

func stringMatcher(m *networking.StringMatch) *matcherv3.StringMatcher {
	switch t := m.GetMatchType().(type) {
	case *networking.StringMatch_Exact:
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: t.Exact}}
	case *networking.StringMatch_Prefix:
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: t.Prefix}}
	case *networking.StringMatch_Regex:
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: t.Regex}}}
	}
	return nil
}

func headerMatcher(name string, m *networking.StringMatch, invert bool) *routev3.HeaderMatcher {
	hm := &routev3.HeaderMatcher{Name: strings.ToLower(name), InvertMatch: invert}
	if sm := stringMatcher(m); sm != nil {
		hm.HeaderMatchSpecifier = &routev3.HeaderMatcher_StringMatch{StringMatch: sm}
	} else {
		hm.HeaderMatchSpecifier = &routev3.HeaderMatcher_PresentMatch{PresentMatch: true}
	}
	return hm
}

func routeMatch(m *networking.HTTPMatchRequest) *routev3.RouteMatch {
	rm := prefixMatch("/")
	if m == nil {
		return rm
	}
	switch t := m.Uri.GetMatchType().(type) {
	case *networking.StringMatch_Exact:
		rm.PathSpecifier = &routev3.RouteMatch_Path{Path: t.Exact}
	case *networking.StringMatch_Prefix:
		rm.PathSpecifier = &routev3.RouteMatch_Prefix{Prefix: t.Prefix}
	case *networking.StringMatch_Regex:
		rm.PathSpecifier = &routev3.RouteMatch_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: t.Regex}}
	}
	if m.IgnoreUriCase {
		rm.CaseSensitive = wrapperspb.Bool(false)
	}
	if m.Method != nil {
		rm.Headers = append(rm.Headers, headerMatcher(":method", m.Method, false))
	}
	if m.Authority != nil {
		rm.Headers = append(rm.Headers, headerMatcher(":authority", m.Authority, false))
	}
	for _, k := range slices.Sorted(maps.Keys(m.Headers)) {
		rm.Headers = append(rm.Headers, headerMatcher(k, m.Headers[k], false))
	}
	for _, k := range slices.Sorted(maps.Keys(m.WithoutHeaders)) {
		rm.Headers = append(rm.Headers, headerMatcher(k, m.WithoutHeaders[k], true))
	}
	for _, k := range slices.Sorted(maps.Keys(m.QueryParams)) {
		qm := &routev3.QueryParameterMatcher{Name: k}
		if sm := stringMatcher(m.QueryParams[k]); sm != nil {
			qm.QueryParameterMatchSpecifier = &routev3.QueryParameterMatcher_StringMatch{StringMatch: sm}
		} else {
			qm.QueryParameterMatchSpecifier = &routev3.QueryParameterMatcher_PresentMatch{PresentMatch: true}
		}
		rm.QueryParameters = append(rm.QueryParameters, qm)
	}
	return rm
}

// destCluster names the cluster of an Istio destination seen from a route
// on port, and makes sure the cluster exists (with no endpoints when the
// host or subset is unknown), so a snapshot never names a missing cluster.
func (b *builder) destCluster(d *networking.Destination, ns string, port uint32) string {
	host := b.m.resolveHost(d.Host, ns)
	p := d.GetPort().GetNumber()
	s := b.m.services[host]
	if p == 0 && s != nil && len(s.ports) == 1 {
		p = s.ports[0].number
	}
	if p == 0 {
		p = port
	}
	name := ClusterName(p, d.Subset, host)
	if _, ok := b.clusters[name]; !ok {
		b.clusters[name] = b.edsCluster(name, nil, protoHTTP)
		b.cla[name] = &endpointv3.ClusterLoadAssignment{ClusterName: name}
	}
	return name
}

func headerOps(ops *networking.Headers_HeaderOperations) (add []*corev3.HeaderValueOption, remove []string) {
	if ops == nil {
		return nil, nil
	}
	for _, k := range slices.Sorted(maps.Keys(ops.Set)) {
		add = append(add, &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: strings.ToLower(k), Value: ops.Set[k]},
			AppendAction: corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD})
	}
	for _, k := range slices.Sorted(maps.Keys(ops.Add)) {
		add = append(add, &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: strings.ToLower(k), Value: ops.Add[k]},
			AppendAction: corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD})
	}
	for _, k := range ops.Remove {
		remove = append(remove, strings.ToLower(k))
	}
	return add, remove
}

func fraction(p *networking.Percent) *typev3.FractionalPercent {
	v := 100.0
	if p != nil {
		v = p.Value
	}
	return &typev3.FractionalPercent{Numerator: uint32(v*10000 + 0.5), Denominator: typev3.FractionalPercent_MILLION}
}

var redirectCodes = map[uint32]routev3.RedirectAction_RedirectResponseCode{
	0: routev3.RedirectAction_MOVED_PERMANENTLY, 301: routev3.RedirectAction_MOVED_PERMANENTLY, 302: routev3.RedirectAction_FOUND,
	303: routev3.RedirectAction_SEE_OTHER, 307: routev3.RedirectAction_TEMPORARY_REDIRECT, 308: routev3.RedirectAction_PERMANENT_REDIRECT,
}

func (b *builder) routeAction(r *routev3.Route, h *networking.HTTPRoute, s *service, port uint32, ns string) {
	if hd := h.Headers; hd != nil {
		r.RequestHeadersToAdd, r.RequestHeadersToRemove = headerOps(hd.Request)
		r.ResponseHeadersToAdd, r.ResponseHeadersToRemove = headerOps(hd.Response)
	}
	if f := h.Fault; f != nil {
		r.TypedPerFilterConfig = map[string]*anypb.Any{filterFault: mustAny(fault(f))}
	}
	switch {
	case h.Redirect != nil:
		rd := h.Redirect
		ra := &routev3.RedirectAction{HostRedirect: rd.Authority, ResponseCode: redirectCodes[rd.RedirectCode]}
		if rd.Uri != "" {
			ra.PathRewriteSpecifier = &routev3.RedirectAction_PathRedirect{PathRedirect: rd.Uri}
		}
		if p, ok := rd.RedirectPort.(*networking.HTTPRedirect_Port); ok {
			ra.PortRedirect = p.Port
		}
		if rd.Scheme != "" {
			ra.SchemeRewriteSpecifier = &routev3.RedirectAction_SchemeRedirect{SchemeRedirect: rd.Scheme}
		}
		r.Action = &routev3.Route_Redirect{Redirect: ra}
		return
	case h.DirectResponse != nil:
		dr := &routev3.DirectResponseAction{Status: h.DirectResponse.Status}
		if body := h.DirectResponse.Body.GetString_(); body != "" {
			dr.Body = &corev3.DataSource{Specifier: &corev3.DataSource_InlineString{InlineString: body}}
		}
		r.Action = &routev3.Route_DirectResponse{DirectResponse: dr}
		return
	}
	ra := &routev3.RouteAction{Timeout: b.timeout(h.Timeout), RetryPolicy: b.retryPolicy(h.Retries), MaxStreamDuration: b.maxStream(h.Timeout)}
	var dests []*networking.HTTPRouteDestination
	for _, d := range h.Route {
		if d.Weight > 0 || len(h.Route) == 1 {
			dests = append(dests, d)
		}
	}
	if len(dests) == 1 && dests[0].Headers == nil {
		ra.ClusterSpecifier = &routev3.RouteAction_Cluster{Cluster: b.destCluster(dests[0].Destination, ns, port)}
	} else {
		wc := &routev3.WeightedCluster{}
		for _, d := range dests {
			cw := &routev3.WeightedCluster_ClusterWeight{Name: b.destCluster(d.Destination, ns, port), Weight: wrapperspb.UInt32(uint32(max(d.Weight, 1)))}
			if len(dests) == 1 {
				cw.Weight = wrapperspb.UInt32(100)
			}
			if hd := d.Headers; hd != nil {
				cw.RequestHeadersToAdd, cw.RequestHeadersToRemove = headerOps(hd.Request)
				cw.ResponseHeadersToAdd, cw.ResponseHeadersToRemove = headerOps(hd.Response)
			}
			wc.Clusters = append(wc.Clusters, cw)
		}
		ra.ClusterSpecifier = &routev3.RouteAction_WeightedClusters{WeightedClusters: wc}
	}
	if rw := h.Rewrite; rw != nil {
		ra.PrefixRewrite = rw.Uri
		if rr := rw.UriRegexRewrite; rr != nil {
			ra.RegexRewrite = &matcherv3.RegexMatchAndSubstitute{Pattern: &matcherv3.RegexMatcher{Regex: rr.Match}, Substitution: rr.Rewrite}
		}
		if rw.Authority != "" {
			ra.HostRewriteSpecifier = &routev3.RouteAction_HostRewriteLiteral{HostRewriteLiteral: rw.Authority}
		}
	}
	if h.Mirror != nil {
		ra.RequestMirrorPolicies = append(ra.RequestMirrorPolicies, &routev3.RouteAction_RequestMirrorPolicy{
			Cluster: b.destCluster(h.Mirror, ns, port), RuntimeFraction: &corev3.RuntimeFractionalPercent{DefaultValue: fraction(h.MirrorPercentage)}})
	}
	for _, mp := range h.Mirrors {
		ra.RequestMirrorPolicies = append(ra.RequestMirrorPolicies, &routev3.RouteAction_RequestMirrorPolicy{
			Cluster: b.destCluster(mp.Destination, ns, port), RuntimeFraction: &corev3.RuntimeFractionalPercent{DefaultValue: fraction(mp.Percentage)}})
	}
	r.Action = &routev3.Route_Route{Route: ra}
}

func fault(f *networking.HTTPFaultInjection) *faultv3.HTTPFault {
	out := &faultv3.HTTPFault{}
	if d := f.Delay; d != nil {
		out.Delay = &faultcommonv3.FaultDelay{Percentage: fraction(d.Percentage)}
		if fd, ok := d.HttpDelayType.(*networking.HTTPFaultInjection_Delay_FixedDelay); ok {
			out.Delay.FaultDelaySecifier = &faultcommonv3.FaultDelay_FixedDelay{FixedDelay: fd.FixedDelay}
		}
	}
	if a := f.Abort; a != nil {
		out.Abort = &faultv3.FaultAbort{Percentage: fraction(a.Percentage)}
		switch e := a.ErrorType.(type) {
		case *networking.HTTPFaultInjection_Abort_HttpStatus:
			out.Abort.ErrorType = &faultv3.FaultAbort_HttpStatus{HttpStatus: uint32(e.HttpStatus)}
		case *networking.HTTPFaultInjection_Abort_GrpcStatus:
			out.Abort.ErrorType = &faultv3.FaultAbort_GrpcStatus{GrpcStatus: grpcCodes[e.GrpcStatus]}
		}
	}
	return out
}

// retryPolicy is Istio's translation of retries, its defaults when unset.
func (b *builder) retryPolicy(rp *networking.HTTPRetry) *routev3.RetryPolicy {
	attempts := uint32(defaultRetryAttempts)
	on := defaultRetryOn
	codes := []uint32{503}
	var perTry, backoff *durationpb.Duration
	if rp != nil {
		if rp.Attempts == 0 {
			return nil
		}
		attempts = uint32(rp.Attempts)
		perTry, backoff = rp.PerTryTimeout, rp.Backoff
		if rp.RetryOn != "" {
			codes = nil
			var conds []string
			for _, c := range splitList(rp.RetryOn) {
				if n, err := strconv.Atoi(c); err == nil {
					codes = append(codes, uint32(n))
					continue
				}
				conds = append(conds, c)
			}
			if len(codes) > 0 && !slices.Contains(conds, "retriable-status-codes") {
				conds = append(conds, "retriable-status-codes")
			}
			on = strings.Join(conds, ",")
		}
	}
	if b.grpc {
		var conds []string
		for _, c := range splitList(on) {
			if grpcRetryConditions[c] {
				conds = append(conds, c)
			}
		}
		if len(conds) == 0 {
			return nil
		}
		out := &routev3.RetryPolicy{RetryOn: strings.Join(conds, ","), NumRetries: wrapperspb.UInt32(attempts)}
		if backoff != nil {
			out.RetryBackOff = &routev3.RetryPolicy_RetryBackOff{BaseInterval: backoff}
		}
		return out
	}
	out := &routev3.RetryPolicy{RetryOn: on, NumRetries: wrapperspb.UInt32(attempts), PerTryTimeout: perTry,
		RetriableStatusCodes: codes, HostSelectionRetryMaxAttempts: 5,
		RetryHostPredicate: []*routev3.RetryPolicy_RetryHostPredicate{{Name: "envoy.retry_host_predicates.previous_hosts",
			ConfigType: &routev3.RetryPolicy_RetryHostPredicate_TypedConfig{TypedConfig: mustAny(&previoushostsv3.PreviousHostsPredicate{})}}}}
	if backoff != nil {
		out.RetryBackOff = &routev3.RetryPolicy_RetryBackOff{BaseInterval: backoff}
	}
	return out
}

// policy is the effective traffic policy of one cluster.
type policy struct {
	lb  *networking.LoadBalancerSettings
	cp  *networking.ConnectionPoolSettings
	od  *networking.OutlierDetection
	tls *networking.ClientTLSSettings
}

func (p *policy) merge(tp *networking.TrafficPolicy, port uint32) {
	if tp == nil {
		return
	}
	p.lb, p.cp, p.od, p.tls = cmp.Or(tp.LoadBalancer, p.lb), cmp.Or(tp.ConnectionPool, p.cp), cmp.Or(tp.OutlierDetection, p.od), cmp.Or(tp.Tls, p.tls)
	for _, pl := range tp.PortLevelSettings {
		if pl.GetPort().GetNumber() == port {
			p.lb, p.cp, p.od, p.tls = cmp.Or(pl.LoadBalancer, p.lb), cmp.Or(pl.ConnectionPool, p.cp), cmp.Or(pl.OutlierDetection, p.od), cmp.Or(pl.Tls, p.tls)
		}
	}
}

// serviceClusters adds the cluster of one service port and one per subset.
func (b *builder) serviceClusters(s *service, sp svcPort) {
	dr := b.m.destinationRule(s.host, b.p.Namespace)
	var base policy
	if dr != nil {
		base.merge(dr.Spec.TrafficPolicy, sp.number)
	}
	b.addCluster(s, sp, "", nil, &base)
	if dr == nil {
		return
	}
	for _, ss := range dr.Spec.Subsets {
		p := base
		p.merge(ss.TrafficPolicy, sp.number)
		b.addCluster(s, sp, ss.Name, ss.Labels, &p)
	}
}

func (b *builder) addCluster(s *service, sp svcPort, subset string, sel map[string]string, p *policy) {
	name := ClusterName(sp.number, subset, s.host)
	proto := sp.protocol
	if p.cp.GetHttp().GetH2UpgradePolicy() == networking.ConnectionPoolSettings_HTTPSettings_UPGRADE && proto != protoTCP {
		proto = protoHTTP2
	}
	c := b.edsCluster(name, p, proto)
	var eps []endpoint
	for _, e := range s.endpoints[sp.number] {
		if len(sel) == 0 || labels.SelectorFromSet(sel).Matches(labels.Set(e.labels)) {
			eps = append(eps, e)
		}
	}
	if s.dns {
		c.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STRICT_DNS}
		c.EdsClusterConfig = nil
		c.DnsRefreshRate = durationpb.New(5 * time.Second)
		c.RespectDnsTtl = true
		c.DnsLookupFamily = clusterv3.Cluster_V4_PREFERRED
		c.LoadAssignment = loadAssignment(name, eps)
	} else {
		b.cla[name] = loadAssignment(name, eps)
	}
	switch {
	case p.tls != nil && p.tls.Mode == networking.ClientTLSSettings_ISTIO_MUTUAL:
		sans := slices.Sorted(slices.Values(p.tls.SubjectAltNames))
		if len(sans) == 0 {
			sans = b.m.serviceSANs(s)
		}
		c.TransportSocket = istioMutualSocket(sans, sp.number, s.host)
	case p.tls != nil && p.tls.Mode != networking.ClientTLSSettings_DISABLE:
		c.TransportSocket = transportSocket(p.tls, s.host)
	case p.tls == nil && s.kube && !b.grpc:
		// Istio's automatic mutual TLS: meshed endpoints over ISTIO_MUTUAL.
		c.TransportSocketMatches = autoMTLSMatches(istioMutualSocket(b.m.serviceSANs(s), sp.number, s.host))
	}
	b.clusters[name] = c
}

func loadAssignment(name string, eps []endpoint) *endpointv3.ClusterLoadAssignment {
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: name}
	if len(eps) == 0 {
		return cla
	}
	le := &endpointv3.LocalityLbEndpoints{Locality: &corev3.Locality{}, LoadBalancingWeight: wrapperspb.UInt32(1)}
	for _, e := range eps {
		lb := &endpointv3.LbEndpoint{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: sockAddr(e.address, e.port)}},
			HealthStatus: e.health}
		if len(e.labels) > 0 || e.pod != "" {
			md := &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{}}
			if len(e.labels) > 0 {
				f := map[string]*structpb.Value{}
				for k, v := range e.labels {
					f[k] = structpb.NewStringValue(v)
				}
				md.FilterMetadata["envoy.lb"] = &structpb.Struct{Fields: f}
				endpointTLSMode(md, e)
			}
			if e.pod != "" {
				md.FilterMetadata["istio"] = &structpb.Struct{Fields: map[string]*structpb.Value{"workload": structpb.NewStringValue(e.pod)}}
			}
			lb.Metadata = md
		}
		le.LbEndpoints = append(le.LbEndpoints, lb)
	}
	cla.Endpoints = []*endpointv3.LocalityLbEndpoints{le}
	return cla
}

func u32(v int32) *wrapperspb.UInt32Value {
	if v <= 0 {
		return wrapperspb.UInt32(unlimited)
	}
	return wrapperspb.UInt32(uint32(v))
}

// edsCluster is an EDS cluster with policy p (nil: defaults).
func (b *builder) edsCluster(name string, p *policy, proto string) *clusterv3.Cluster {
	if p == nil {
		p = &policy{}
	}
	c := &clusterv3.Cluster{Name: name, ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{EdsConfig: adsSource(), ServiceName: name},
		ConnectTimeout:   cmp.Or(p.cp.GetTcp().GetConnectTimeout(), durationpb.New(10*time.Second)),
		LbPolicy:         clusterv3.Cluster_LEAST_REQUEST}
	switch p.lb.GetSimple() {
	case networking.LoadBalancerSettings_ROUND_ROBIN:
		c.LbPolicy = clusterv3.Cluster_ROUND_ROBIN
	case networking.LoadBalancerSettings_UNSPECIFIED:
		if b.grpc {
			c.LbPolicy = clusterv3.Cluster_ROUND_ROBIN
		}
	}
	h := p.cp.GetHttp()
	c.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{
		Priority: corev3.RoutingPriority_DEFAULT, MaxConnections: u32(p.cp.GetTcp().GetMaxConnections()),
		MaxPendingRequests: u32(h.GetHttp1MaxPendingRequests()), MaxRequests: u32(h.GetHttp2MaxRequests()), MaxRetries: u32(h.GetMaxRetries()),
	}}}
	if b.grpc {
		c.ConnectTimeout = nil
		c.CircuitBreakers.Thresholds[0] = &clusterv3.CircuitBreakers_Thresholds{MaxRequests: u32(h.GetHttp2MaxRequests())}
	}
	if proto != protoTCP && !b.grpc {
		opts := &httpv3.HttpProtocolOptions{}
		switch proto {
		case protoHTTP:
			opts.UpstreamProtocolOptions = &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_HttpProtocolOptions{HttpProtocolOptions: &corev3.Http1ProtocolOptions{}}}}
		case protoHTTP2, protoGRPC:
			opts.UpstreamProtocolOptions = &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}}}}
		default:
			opts.UpstreamProtocolOptions = &httpv3.HttpProtocolOptions_UseDownstreamProtocolConfig{UseDownstreamProtocolConfig: &httpv3.HttpProtocolOptions_UseDownstreamHttpConfig{}}
		}
		if h.GetIdleTimeout() != nil || h.GetMaxRequestsPerConnection() > 0 {
			opts.CommonHttpProtocolOptions = &corev3.HttpProtocolOptions{IdleTimeout: h.GetIdleTimeout()}
			if n := h.GetMaxRequestsPerConnection(); n > 0 {
				opts.CommonHttpProtocolOptions.MaxRequestsPerConnection = wrapperspb.UInt32(uint32(n))
			}
		}
		c.TypedExtensionProtocolOptions = map[string]*anypb.Any{httpOptionsKey: mustAny(opts)}
	}
	if od := p.od; od != nil {
		o := &clusterv3.OutlierDetection{Interval: cmp.Or(od.Interval, durationpb.New(10*time.Second)),
			BaseEjectionTime: cmp.Or(od.BaseEjectionTime, durationpb.New(30*time.Second)), EnforcingSuccessRate: wrapperspb.UInt32(0)}
		if v := od.GetConsecutive_5XxErrors(); v != nil {
			o.Consecutive_5Xx = wrapperspb.UInt32(v.Value)
			o.EnforcingConsecutive_5Xx = wrapperspb.UInt32(map[bool]uint32{true: 100, false: 0}[v.Value > 0])
		} else {
			o.EnforcingConsecutive_5Xx = wrapperspb.UInt32(0)
		}
		if v := od.GetConsecutiveGatewayErrors(); v != nil {
			o.ConsecutiveGatewayFailure = wrapperspb.UInt32(v.Value)
			o.EnforcingConsecutiveGatewayFailure = wrapperspb.UInt32(map[bool]uint32{true: 100, false: 0}[v.Value > 0])
		}
		if v := od.GetConsecutiveLocalOriginFailures(); v != nil {
			o.SplitExternalLocalOriginErrors = true
			o.ConsecutiveLocalOriginFailure = wrapperspb.UInt32(v.Value)
			o.EnforcingConsecutiveLocalOriginFailure = wrapperspb.UInt32(100)
		}
		if od.MaxEjectionPercent > 0 {
			o.MaxEjectionPercent = wrapperspb.UInt32(uint32(od.MaxEjectionPercent))
		}
		c.OutlierDetection = o
	}
	return c
}

func transportSocket(t *networking.ClientTLSSettings, host string) *corev3.TransportSocket {
	ctx := &tlsv3.UpstreamTlsContext{Sni: cmp.Or(t.Sni, host), CommonTlsContext: &tlsv3.CommonTlsContext{
		TlsParams: &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2}}}
	if !t.GetInsecureSkipVerify().GetValue() {
		vc := &tlsv3.CertificateValidationContext{TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_Filename{
			Filename: cmp.Or(t.CaCertificates, systemCABundle)}}}
		sans := slices.Clone(t.SubjectAltNames)
		sort.Strings(sans)
		for _, san := range sans {
			typ := tlsv3.SubjectAltNameMatcher_DNS
			switch {
			case strings.Contains(san, "://"):
				typ = tlsv3.SubjectAltNameMatcher_URI
			case strings.Trim(san, "0123456789.:abcdefABCDEF") == "" && strings.ContainsAny(san, ".:") && !strings.ContainsAny(san, "ghijklmnopqrstuvwxyz"):
				typ = tlsv3.SubjectAltNameMatcher_IP_ADDRESS
			}
			vc.MatchTypedSubjectAltNames = append(vc.MatchTypedSubjectAltNames, &tlsv3.SubjectAltNameMatcher{SanType: typ,
				Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: san}}})
		}
		ctx.CommonTlsContext.ValidationContextType = &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: vc}
	}
	if t.Mode == networking.ClientTLSSettings_MUTUAL {
		ctx.CommonTlsContext.TlsCertificates = []*tlsv3.TlsCertificate{{
			CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: t.ClientCertificate}},
			PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: t.PrivateKey}}}}
	}
	return &corev3.TransportSocket{Name: socketTLS, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(ctx)}}
}
