package xds

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rbactcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	tcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	previoushostsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/meshlet/meshlet/internal/meshports"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/rbac"
)

// Type URLs of the resources the client subscribes to.
const (
	typePrefix   = "type.googleapis.com/"
	ListenerType = typePrefix + "envoy.config.listener.v3.Listener"
	RouteType    = typePrefix + "envoy.config.route.v3.RouteConfiguration"
	ClusterType  = typePrefix + "envoy.config.cluster.v3.Cluster"
	EndpointType = typePrefix + "envoy.config.endpoint.v3.ClusterLoadAssignment"
)

// typeOrder is Envoy's make-before-break order: clusters and their
// endpoints before the listeners and routes that use them.
var typeOrder = []string{ClusterType, EndpointType, ListenerType, RouteType}

// shortType names a type in messages (NACKs, logs, metrics).
func shortType(typeURL string) string {
	switch typeURL {
	case ListenerType:
		return "Listener"
	case RouteType:
		return "RouteConfiguration"
	case ClusterType:
		return "Cluster"
	case EndpointType:
		return "ClusterLoadAssignment"
	}
	return strings.TrimPrefix(typeURL, typePrefix)
}

// metricType is the Envoy short name (lds, rds, cds, eds) used as a label.
func metricType(typeURL string) string {
	switch typeURL {
	case ListenerType:
		return "lds"
	case RouteType:
		return "rds"
	case ClusterType:
		return "cds"
	case EndpointType:
		return "eds"
	}
	return "unknown"
}

const (
	filterHCM    = "envoy.filters.network.http_connection_manager"
	filterTCP    = "envoy.filters.network.tcp_proxy"
	filterFault  = "envoy.filters.http.fault"
	filterRouter = "envoy.filters.http.router"
	httpOptsKey  = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

	passthroughCluster = "PassthroughCluster"
	blackholeCluster   = "BlackHoleCluster"
)

func init() {
	for _, m := range []proto.Message{&hcmv3.HttpConnectionManager{}, &tcpv3.TcpProxy{}, &faultv3.HTTPFault{},
		&routerv3.Router{}, &httpv3.HttpProtocolOptions{}, &tlsv3.UpstreamTlsContext{}, &previoushostsv3.PreviousHostsPredicate{},
		&rbachttpv3.RBAC{}, &rbactcpv3.RBAC{}} {
		anyTypes[typePrefix+string(m.ProtoReflect().Descriptor().FullName())] = true
	}
}

// The fields of each resource type that the proxy honours (see
// docs/xds.md). Anything else set in a resource is NACKed.
var (
	routeConfigFields = []string{
		"name", "validate_clusters",
		"virtual_hosts.name", "virtual_hosts.domains",
		"virtual_hosts.routes.name", "virtual_hosts.routes.metadata/*",
		"virtual_hosts.routes.match.prefix", "virtual_hosts.routes.match.path", "virtual_hosts.routes.match.safe_regex.regex",
		"virtual_hosts.routes.match.headers.name", "virtual_hosts.routes.match.headers.present_match",
		"virtual_hosts.routes.match.headers.string_match.exact", "virtual_hosts.routes.match.headers.string_match.prefix",
		"virtual_hosts.routes.match.headers.string_match.safe_regex.regex",
		"virtual_hosts.routes.route.cluster",
		"virtual_hosts.routes.route.weighted_clusters.clusters.name", "virtual_hosts.routes.route.weighted_clusters.clusters.weight",
		"virtual_hosts.routes.route.timeout",
		"virtual_hosts.routes.route.retry_policy.num_retries", "virtual_hosts.routes.route.retry_policy.retry_on",
		"virtual_hosts.routes.route.retry_policy.retriable_status_codes", "virtual_hosts.routes.route.retry_policy.per_try_timeout",
		"virtual_hosts.routes.route.retry_policy.retry_host_predicate.name",
		"virtual_hosts.routes.route.retry_policy.retry_host_predicate.typed_config",
		"virtual_hosts.routes.route.retry_policy.host_selection_retry_max_attempts",
		"virtual_hosts.routes.route.retry_policy.retry_back_off.base_interval",
		"virtual_hosts.routes.route.retry_policy.retry_back_off.max_interval",
		"virtual_hosts.routes.route.prefix_rewrite", "virtual_hosts.routes.route.host_rewrite_literal",
		"virtual_hosts.routes.route.request_mirror_policies.cluster",
		"virtual_hosts.routes.route.request_mirror_policies.runtime_fraction.default_value.numerator",
		"virtual_hosts.routes.route.request_mirror_policies.runtime_fraction.default_value.denominator",
		"virtual_hosts.routes.request_headers_to_add.header.key", "virtual_hosts.routes.request_headers_to_add.header.value",
		"virtual_hosts.routes.request_headers_to_add.append_action", "virtual_hosts.routes.request_headers_to_remove",
		"virtual_hosts.routes.response_headers_to_add.header.key", "virtual_hosts.routes.response_headers_to_add.header.value",
		"virtual_hosts.routes.response_headers_to_add.append_action", "virtual_hosts.routes.response_headers_to_remove",
		"virtual_hosts.routes.typed_per_filter_config",
		"virtual_hosts.routes.typed_per_filter_config.delay.fixed_delay",
		"virtual_hosts.routes.typed_per_filter_config.delay.percentage.numerator",
		"virtual_hosts.routes.typed_per_filter_config.delay.percentage.denominator",
		"virtual_hosts.routes.typed_per_filter_config.abort.http_status",
		"virtual_hosts.routes.typed_per_filter_config.abort.grpc_status",
		"virtual_hosts.routes.typed_per_filter_config.abort.percentage.numerator",
		"virtual_hosts.routes.typed_per_filter_config.abort.percentage.denominator",
		// allow_any under REGISTRY_ONLY: direct_response 502 (checked below).
		"virtual_hosts.routes.direct_response.status",
	}
	routeConfigSchema = newSchema(routeConfigFields...)

	hcmFields = []string{
		"stat_prefix", "codec_type", "rds.config_source/*", "rds.route_config_name",
		"http_filters.name", "http_filters.is_optional", "http_filters.typed_config",
	}
	listenerSchema = func() schema {
		paths := []string{"name", "address.socket_address.address", "address.socket_address.port_value",
			"use_original_dst", "bind_to_port", "traffic_direction", "stat_prefix", "metadata/*",
			"listener_filters.name", "listener_filters.typed_config"}
		for _, chain := range []string{"filter_chains", "default_filter_chain"} {
			// Inbound mutual TLS (checked by peerOfChain).
			paths = append(paths, chain+".filter_chain_match.transport_protocol", chain+".filter_chain_match.application_protocols",
				chain+".transport_socket.name", chain+".transport_socket.typed_config",
				chain+".transport_socket.typed_config.require_client_certificate",
				chain+".transport_socket.typed_config.common_tls_context.alpn_protocols",
				chain+".transport_socket.typed_config.common_tls_context.tls_params.tls_minimum_protocol_version",
				chain+".transport_socket.typed_config.common_tls_context.tls_certificate_sds_secret_configs.name",
				chain+".transport_socket.typed_config.common_tls_context.tls_certificate_sds_secret_configs.sds_config/*",
				chain+".transport_socket.typed_config.common_tls_context.combined_validation_context.default_validation_context",
				chain+".transport_socket.typed_config.common_tls_context.combined_validation_context.validation_context_sds_secret_config.name",
				chain+".transport_socket.typed_config.common_tls_context.combined_validation_context.validation_context_sds_secret_config.sds_config/*")
			paths = append(paths, chain+".name", chain+".filter_chain_match.destination_port", chain+".filters.name",
				chain+".filters.typed_config", chain+".filters.typed_config.cluster",
				// The RBAC filters' rules: proxy/rbac names what it cannot evaluate.
				chain+".filters.typed_config.rules/*", chain+".filters.typed_config.http_filters.typed_config.rules/*")
			for _, f := range hcmFields {
				paths = append(paths, chain+".filters.typed_config."+f)
			}
			for _, f := range routeConfigFields {
				paths = append(paths, chain+".filters.typed_config.route_config."+f)
			}
		}
		return newSchema(paths...)
	}()

	claFields = []string{"cluster_name", "endpoints.locality/*", "endpoints.load_balancing_weight",
		"endpoints.lb_endpoints.endpoint.address.socket_address.address",
		"endpoints.lb_endpoints.endpoint.address.socket_address.port_value",
		"endpoints.lb_endpoints.health_status", "endpoints.lb_endpoints.metadata/*",
		"endpoints.lb_endpoints.load_balancing_weight"}
	claSchema = newSchema(claFields...)

	clusterSchema = func() schema {
		paths := []string{"name", "type", "eds_cluster_config/*", "dns_refresh_rate", "respect_dns_ttl",
			"dns_lookup_family", "lb_policy", "connect_timeout", "metadata/*",
			"circuit_breakers.thresholds.priority", "circuit_breakers.thresholds.max_connections",
			"circuit_breakers.thresholds.max_pending_requests", "circuit_breakers.thresholds.max_requests",
			"circuit_breakers.thresholds.max_retries",
			"typed_extension_protocol_options",
			"typed_extension_protocol_options.explicit_http_config.http_protocol_options",
			"typed_extension_protocol_options.explicit_http_config.http2_protocol_options",
			"typed_extension_protocol_options.use_downstream_protocol_config",
			"typed_extension_protocol_options.common_http_protocol_options.idle_timeout",
			"typed_extension_protocol_options.common_http_protocol_options.max_requests_per_connection",
			"outlier_detection.consecutive_5xx", "outlier_detection.enforcing_consecutive_5xx",
			"outlier_detection.consecutive_gateway_failure", "outlier_detection.enforcing_consecutive_gateway_failure",
			"outlier_detection.split_external_local_origin_errors", "outlier_detection.consecutive_local_origin_failure",
			"outlier_detection.enforcing_consecutive_local_origin_failure", "outlier_detection.interval",
			"outlier_detection.base_ejection_time", "outlier_detection.max_ejection_percent",
			"outlier_detection.max_ejection_time", "outlier_detection.enforcing_success_rate",
			"transport_socket.name", "transport_socket.typed_config",
			"transport_socket.typed_config.sni",
			"transport_socket.typed_config.common_tls_context.validation_context.trusted_ca.filename",
			"transport_socket.typed_config.common_tls_context.validation_context.match_typed_subject_alt_names.san_type",
			"transport_socket.typed_config.common_tls_context.validation_context.match_typed_subject_alt_names.matcher.exact",
			"transport_socket.typed_config.common_tls_context.tls_params.tls_minimum_protocol_version",
			"transport_socket.typed_config.common_tls_context.alpn_protocols",
			"transport_socket.typed_config.common_tls_context.tls_certificates.certificate_chain.filename",
			"transport_socket.typed_config.common_tls_context.tls_certificates.private_key.filename",
			"transport_socket_matches.name", "transport_socket_matches.match/*",
			"transport_socket_matches.transport_socket.name", "transport_socket_matches.transport_socket.typed_config",
			"transport_socket_matches.transport_socket.typed_config.sni",
			"transport_socket_matches.transport_socket.typed_config.common_tls_context.alpn_protocols",
			"transport_socket_matches.transport_socket.typed_config.common_tls_context.tls_params.tls_minimum_protocol_version",
		}
		for _, f := range istioMutualFields {
			paths = append(paths, "transport_socket."+f, "transport_socket_matches.transport_socket."+f)
		}
		for _, f := range claFields {
			paths = append(paths, "load_assignment."+f)
		}
		return newSchema(paths...)
	}()
)

// resourceError collects the problems of one resource; its message is the
// contract's NACK format: "TYPE NAME: FIELD: REASON; …".
type resourceError struct {
	typeURL, name string
	problems      []string
}

func (e *resourceError) add(format string, a ...any) {
	e.problems = append(e.problems, fmt.Sprintf(format, a...))
}

func (e *resourceError) err() error {
	if len(e.problems) == 0 {
		return nil
	}
	parts := make([]string, len(e.problems))
	for i, p := range e.problems {
		parts[i] = fmt.Sprintf("%s %s: %s", shortType(e.typeURL), e.name, p)
	}
	return errors.New(strings.Join(parts, "; "))
}

// listenerInfo is what a Listener contributes to the engine configuration.
type listenerInfo struct {
	// routeNames are the RDS route configurations its HTTP filter chains use.
	routeNames []string
	// tcpPort is set for a VIP_PORT listener (a TCP service port).
	tcpPort uint16
	// httpPort is set for a 0.0.0.0_PORT listener.
	httpPort uint16
	// mtls is the inbound listener's PeerAuthentication per port (nil: no
	// mutual TLS chain, or not the inbound listener).
	mtls *config.InboundMTLS
	// authz is the inbound listener's compiled authorization (nil on
	// other listeners).
	authz *inboundAuthz
}

// decodeListener checks a Listener against the contract and extracts what
// the engine uses.
func decodeListener(l *listenerv3.Listener) (listenerInfo, error) {
	re := &resourceError{typeURL: ListenerType, name: l.GetName()}
	for _, p := range listenerSchema.check(l) {
		re.add("%s", p)
	}
	var info listenerInfo
	pv := l.GetAddress().GetSocketAddress().GetPortValue()
	if pv > 65535 {
		re.add("address.socket_address.port_value: %d is not a port", pv)
	}
	port := uint16(pv)
	chains := l.GetFilterChains()
	if dc := l.GetDefaultFilterChain(); dc != nil {
		chains = append(chains[:len(chains):len(chains)], dc)
	}
	inbound := l.GetTrafficDirection() == corev3.TrafficDirection_INBOUND || l.GetName() == "virtualInbound"
	if inbound {
		info.authz = &inboundAuthz{http: map[uint32]*rbac.Engine{}, tcp: map[uint32]*rbac.Engine{}}
	}
	for i, lf := range l.GetListenerFilters() {
		if lf.GetName() != listenerTLSInspector {
			re.add("listener_filters[%d].name: %q is not supported (%s only)", i, lf.GetName(), listenerTLSInspector)
		}
	}
	var peers []chainPeer
	for i, fc := range chains {
		field := fmt.Sprintf("filter_chains[%d]", i)
		if fc == l.GetDefaultFilterChain() {
			field = "default_filter_chain"
		}
		if inbound {
			cp := peerOfChain(re, field, fc)
			peers = append(peers, cp)
			// A chain refusing plain text has no rules of its own; a chain
			// without destination_port (the mutual TLS passthrough) has the
			// default chain's.
			if !cp.blackhole {
				chainAuthz(re, info.authz, field, fc, fc == l.GetDefaultFilterChain() || cp.port == 0)
			}
		} else if fc.GetTransportSocket() != nil || fc.GetFilterChainMatch().GetTransportProtocol() != "" {
			re.add("%s: transport_socket and transport_protocol are only supported on the inbound listener", field)
		}
		for j, f := range fc.GetFilters() {
			ff := fmt.Sprintf("%s.filters[%d]", field, j)
			if f.GetName() == filterNetworkRBAC && !inbound {
				rbacFilterOutbound(re, ff, f.GetName())
			}
			cfg, err := f.GetTypedConfig().UnmarshalNew()
			if err != nil {
				continue // reported by the schema walk
			}
			switch c := cfg.(type) {
			case *hcmv3.HttpConnectionManager:
				checkHTTPFilters(re, ff+".typed_config", c, inbound)
				if c.GetCodecType() != hcmv3.HttpConnectionManager_AUTO {
					re.add("%s.typed_config.codec_type: %s is not supported (AUTO only)", ff, c.GetCodecType())
				}
				switch rs := c.GetRouteSpecifier().(type) {
				case *hcmv3.HttpConnectionManager_Rds:
					if rs.Rds.GetConfigSource().GetAds() == nil {
						re.add("%s.typed_config.rds.config_source: only ads {} is supported", ff)
					}
					if rs.Rds.GetRouteConfigName() == "" {
						re.add("%s.typed_config.rds.route_config_name: must not be empty", ff)
					} else if !inbound {
						info.routeNames = append(info.routeNames, rs.Rds.GetRouteConfigName())
					}
				case *hcmv3.HttpConnectionManager_RouteConfig:
					if !inbound {
						re.add("%s.typed_config.route_config: an inline route configuration is only supported on the inbound listener", ff)
					}
				default:
					re.add("%s.typed_config: the HTTP connection manager needs rds or route_config", ff)
				}
				if !inbound && port != 0 && port != meshports.Outbound {
					info.httpPort = port
				}
			case *tcpv3.TcpProxy:
				cl := c.GetCluster()
				switch {
				case inbound:
				case l.GetName() == "virtualOutbound" || l.GetUseOriginalDst().GetValue():
					if cl == blackholeCluster {
						re.add("%s.typed_config.cluster: %s (outboundTrafficPolicy REGISTRY_ONLY) is not supported yet", ff, cl)
					} else if cl != passthroughCluster {
						re.add("%s.typed_config.cluster: %q: the outbound listener passes through to the original destination only", ff, cl)
					}
				default:
					// A TCP service port: the connection goes to its original
					// destination (the VIP) as opaque TCP.
					info.tcpPort = port
				}
			}
		}
	}
	if inbound {
		info.mtls = inboundMTLS(peers, l.GetDefaultFilterChain() != nil)
	}
	return info, re.err()
}

func checkHTTPFilters(re *resourceError, field string, c *hcmv3.HttpConnectionManager, inbound bool) {
	fs := c.GetHttpFilters()
	for i, f := range fs {
		switch f.GetName() {
		case filterFault:
		case filterHTTPRBAC:
			if !inbound {
				rbacFilterOutbound(re, fmt.Sprintf("%s.http_filters[%d]", field, i), f.GetName())
			}
		case filterRouter:
			if i != len(fs)-1 {
				re.add("%s.http_filters[%d]: the router must be the last filter", field, i)
			}
		default:
			if !f.GetIsOptional() {
				re.add("%s.http_filters[%d].name: %q is not supported", field, i, f.GetName())
			}
		}
	}
	if len(fs) == 0 || fs[len(fs)-1].GetName() != filterRouter {
		re.add("%s.http_filters: must end with %s", field, filterRouter)
	}
}

// decodeRoutes translates a RouteConfiguration into engine services, one
// per virtual host, restricted to the port the configuration is named by
// ("9080", or "host:9080" for proxyless names). Virtual hosts whose every
// route goes to the passthrough cluster are left out: the engine passes
// unmatched traffic through to the original destination itself.
func decodeRoutes(rc *routev3.RouteConfiguration) ([]service, error) {
	re := &resourceError{typeURL: RouteType, name: rc.GetName()}
	for _, p := range routeConfigSchema.check(rc) {
		re.add("%s", p)
	}
	ports := routePorts(rc.GetName())
	var out []service
	for i, vh := range rc.GetVirtualHosts() {
		if svc, ok := decodeVirtualHost(re, i, vh, rc.GetName(), ports); ok {
			out = append(out, svc)
		}
	}
	return out, re.err()
}

// vhost is one virtual host of an accepted RouteConfiguration: its
// encoding (a part of the resource's) and its translation, so that the
// next version of the configuration decodes only the virtual hosts that
// changed.
type vhost struct {
	name string
	raw  []byte
	svc  service
	ok   bool // it is a service (not left out as passthrough only)
}

// vhostSchema is the schema of routeConfigSchema's virtual hosts.
var vhostSchema = routeConfigSchema.children["virtual_hosts"]

// decodeRouteConfig is decodeRoutes for an encoded RouteConfiguration,
// one virtual host at a time: a virtual host whose name and bytes are
// those of one in prev (the virtual hosts of the configuration's accepted
// version) keeps its translation without being decoded or checked again;
// the others are, as decodeRoutes does, with the same messages. ok is
// false when the bytes cannot be split (the caller decodes them whole,
// which names the error).
func decodeRouteConfig(b []byte, prev []vhost) (name string, svcs []service, vhs []vhost, err error, ok bool) { //nolint:revive // ok qualifies err (whether the bytes could be split), so it follows it
	rest, parts, ok := splitField(b, 2) // virtual_hosts
	if !ok {
		return "", nil, nil, nil, false
	}
	rc := &routev3.RouteConfiguration{}
	if proto.Unmarshal(rest, rc) != nil {
		return "", nil, nil, nil, false
	}
	var old map[string]*vhost
	if len(prev) > 0 {
		old = make(map[string]*vhost, len(prev))
		for i := range prev {
			old[prev[i].name] = &prev[i]
		}
	}
	var problems []string
	routeConfigSchema.walk(rc.ProtoReflect(), nil, &problems)
	vhs = make([]vhost, len(parts))
	decoded := make([]*routev3.VirtualHost, len(parts))
	for i, p := range parts {
		n, _ := wireName(p)
		if o := old[string(n)]; o != nil && bytes.Equal(o.raw, p) {
			vhs[i] = *o
			vhs[i].raw = p
			continue
		}
		vh := &routev3.VirtualHost{}
		if proto.Unmarshal(p, vh) != nil {
			return "", nil, nil, nil, false
		}
		vhostSchema.walk(vh.ProtoReflect(), &pathElem{name: "virtual_hosts", index: i}, &problems)
		decoded[i] = vh
		vhs[i] = vhost{name: vh.GetName(), raw: p}
	}
	sort.Strings(problems)
	re := &resourceError{typeURL: RouteType, name: rc.GetName(), problems: problems}
	ports := routePorts(rc.GetName())
	for i, vh := range decoded {
		if vh != nil {
			vhs[i].svc, vhs[i].ok = decodeVirtualHost(re, i, vh, rc.GetName(), ports)
		}
		if vhs[i].ok {
			svcs = append(svcs, vhs[i].svc)
		}
	}
	return rc.GetName(), svcs, vhs, re.err(), true
}

// routePorts is the port a route configuration is named by ("9080", or
// "host:9080" for proxyless names); none: every port.
func routePorts(name string) []portConfig {
	if i := strings.LastIndexByte(name, ':'); i >= 0 {
		name = name[i+1:]
	}
	if p, err := strconv.ParseUint(name, 10, 16); err == nil && p > 0 {
		return []portConfig{{Port: uint16(p)}}
	}
	return nil
}

// decodeVirtualHost translates virtual host i of the route configuration
// rcName into a service on ports; ok is false when it is left out (no
// routes, or passthrough only).
func decodeVirtualHost(re *resourceError, i int, vh *routev3.VirtualHost, rcName string, ports []portConfig) (service, bool) {
	vf := fmt.Sprintf("virtual_hosts[%d]", i)
	svc := service{Name: rcName + "/" + vh.GetName(), Ports: ports}
	seenHost, seenAddr := map[string]bool{}, map[string]bool{}
	for j, d := range vh.GetDomains() {
		host := d
		if h, _, ok := strings.Cut(d, "]:"); ok && strings.HasPrefix(d, "[") {
			host = strings.TrimPrefix(h, "[")
		} else if k := strings.LastIndexByte(d, ':'); k >= 0 && strings.Count(d, ":") == 1 {
			host = d[:k]
		}
		if ip, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil {
			if !seenAddr[ip.String()] {
				seenAddr[ip.String()] = true
				svc.Addresses = append(svc.Addresses, ip.String())
			}
			continue
		}
		host = strings.ToLower(host)
		if host == "" || strings.Contains(host[min(1, len(host)):], "*") {
			re.add("%s.domains[%d]: %q: only a leading \"*.\" wildcard (or \"*\") is supported", vf, j, d)
			continue
		}
		if !seenHost[host] {
			seenHost[host] = true
			svc.Hosts = append(svc.Hosts, host)
		}
	}
	passthrough := 0
	for j, r := range vh.GetRoutes() {
		rf := fmt.Sprintf("%s.routes[%d]", vf, j)
		if a := r.GetRoute(); a != nil && a.GetCluster() == passthroughCluster {
			passthrough++
			continue
		}
		if dr := r.GetDirectResponse(); dr != nil {
			re.add("%s.direct_response: status %d is not supported yet", rf, dr.GetStatus())
			continue
		}
		rt, ok := decodeRoute(re, rf, r, j)
		if ok {
			svc.Routes = append(svc.Routes, rt)
		}
	}
	if passthrough > 0 && len(svc.Routes) > 0 {
		re.add("%s: routes to %s mixed with other routes are not supported", vf, passthroughCluster)
	}
	return svc, len(svc.Routes) > 0
}

func decodeRoute(re *resourceError, rf string, r *routev3.Route, idx int) (route, bool) {
	rt := route{Name: r.GetName()}
	if rt.Name == "" {
		rt.Name = "route-" + strconv.Itoa(idx)
	}
	a := r.GetRoute()
	if a == nil {
		re.add("%s: a route needs a route action (redirect and direct_response are not supported yet)", rf)
		return rt, false
	}
	// Match.
	m := match{}
	mt := r.GetMatch()
	switch ps := mt.GetPathSpecifier().(type) {
	case *routev3.RouteMatch_Prefix:
		// "" and "/" match every request: no URI condition.
		if ps.Prefix != "" && ps.Prefix != "/" {
			m.URI = &stringMatch{Prefix: ps.Prefix}
		}
	case *routev3.RouteMatch_Path:
		m.URI = &stringMatch{Exact: ps.Path}
	case *routev3.RouteMatch_SafeRegex:
		m.URI = &stringMatch{Regex: ps.SafeRegex.GetRegex()}
	case nil:
		re.add("%s.match: a path specifier (prefix, path or safe_regex) is required", rf)
	default:
		re.add("%s.match: path specifier %T is not supported", rf, ps)
	}
	for k, h := range mt.GetHeaders() {
		hf := fmt.Sprintf("%s.match.headers[%d]", rf, k)
		var sm stringMatch
		switch {
		case h.GetPresentMatch():
			sm.Present = true
		case h.GetStringMatch() != nil:
			sm = fromStringMatcher(re, hf+".string_match", h.GetStringMatch())
		default:
			re.add("%s: set string_match or present_match", hf)
			continue
		}
		switch name := strings.ToLower(h.GetName()); {
		case name == ":method" && sm.Exact != "":
			m.Method = sm.Exact
		case name == ":method":
			re.add("%s: a :method match other than exact is not supported", hf)
		case name == ":authority":
			if sm.Present {
				continue // every request has an authority
			}
			m.Authority = &sm
		case strings.HasPrefix(name, ":"):
			re.add("%s.name: pseudo-header %q is not supported", hf, h.GetName())
		default:
			if m.Headers == nil {
				m.Headers = map[string]stringMatch{}
			}
			if _, dup := m.Headers[name]; dup {
				re.add("%s.name: %q matched twice in one route", hf, name)
			}
			m.Headers[name] = sm
		}
	}
	if m.URI != nil || m.Method != "" || m.Authority != nil || len(m.Headers) > 0 {
		rt.Match = []match{m}
	}
	// Destinations.
	switch cs := a.GetClusterSpecifier().(type) {
	case *routev3.RouteAction_Cluster:
		rt.Destinations = []destination{{Cluster: cs.Cluster}}
	case *routev3.RouteAction_WeightedClusters:
		for k, wc := range cs.WeightedClusters.GetClusters() {
			if wc.GetName() == "" {
				re.add("%s.route.weighted_clusters.clusters[%d].name: must not be empty", rf, k)
			}
			rt.Destinations = append(rt.Destinations, destination{Cluster: wc.GetName(), Weight: wc.GetWeight().GetValue()})
		}
		if len(rt.Destinations) == 0 {
			re.add("%s.route.weighted_clusters: no clusters", rf)
		}
	default:
		re.add("%s.route: only cluster and weighted_clusters are supported", rf)
	}
	if t := a.GetTimeout(); t != nil {
		rt.Timeout = dur(durationOf(re, rf+".route.timeout", t))
	}
	if rp := a.GetRetryPolicy(); rp != nil {
		rt.Retries = decodeRetry(re, rf+".route.retry_policy", rp)
	}
	if pr := a.GetPrefixRewrite(); pr != "" {
		if _, ok := mt.GetPathSpecifier().(*routev3.RouteMatch_Prefix); ok && m.URI == nil {
			// The engine rewrites the matched prefix only when the route
			// has one; "/" is a prefix like any other here.
			m.URI = &stringMatch{Prefix: "/"}
			rt.Match = []match{m}
		}
		if m.URI != nil && m.URI.Exact == "" && m.URI.Prefix == "" {
			re.add("%s.route.prefix_rewrite: only with a prefix or path match", rf)
		}
		rt.Rewrite = &rewrite{URI: pr}
	}
	if h := a.GetHostRewriteLiteral(); h != "" {
		if rt.Rewrite == nil {
			rt.Rewrite = &rewrite{}
		}
		rt.Rewrite.Authority = h
	}
	if mp := a.GetRequestMirrorPolicies(); len(mp) > 0 {
		if len(mp) > 1 {
			re.add("%s.route.request_mirror_policies: %d policies; only one is supported", rf, len(mp))
		}
		pct := 100.0
		if rf := mp[0].GetRuntimeFraction(); rf != nil {
			pct = percentOf(rf.GetDefaultValue())
		}
		rt.Mirror = &mirror{Cluster: mp[0].GetCluster(), Percent: pct}
	}
	// Header operations.
	rt.Headers = decodeHeaderOps(re, rf, r)
	// Faults.
	for k, v := range r.GetTypedPerFilterConfig() {
		if k != filterFault {
			re.add("%s.typed_per_filter_config[%q]: filter is not supported", rf, k)
			continue
		}
		cfg, err := v.UnmarshalNew()
		if err != nil {
			continue
		}
		hf, ok := cfg.(*faultv3.HTTPFault)
		if !ok {
			re.add("%s.typed_per_filter_config[%q]: %s is not an HTTPFault", rf, k, v.GetTypeUrl())
			continue
		}
		rt.Fault = decodeFault(re, fmt.Sprintf("%s.typed_per_filter_config[%q]", rf, k), hf)
	}
	return rt, true
}

func fromStringMatcher(re *resourceError, field string, sm *matcherv3.StringMatcher) stringMatch {
	if sm.GetIgnoreCase() {
		re.add("%s.ignore_case: not supported", field)
	}
	switch p := sm.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		return stringMatch{Exact: p.Exact}
	case *matcherv3.StringMatcher_Prefix:
		return stringMatch{Prefix: p.Prefix}
	case *matcherv3.StringMatcher_SafeRegex:
		return stringMatch{Regex: p.SafeRegex.GetRegex()}
	default:
		re.add("%s: only exact, prefix and safe_regex are supported", field)
	}
	return stringMatch{}
}

func decodeRetry(re *resourceError, field string, rp *routev3.RetryPolicy) *retryPolicy {
	out := &retryPolicy{Attempts: int(rp.GetNumRetries().GetValue())}
	if rp.GetNumRetries() == nil {
		out.Attempts = 1 // Envoy's default
	}
	if out.Attempts > 10 {
		re.add("%s.num_retries: %d is more than 10", field, out.Attempts)
	}
	for _, c := range strings.Split(rp.GetRetryOn(), ",") {
		if c = strings.TrimSpace(c); c != "" {
			out.RetryOn = append(out.RetryOn, c)
		}
	}
	for _, c := range rp.GetRetriableStatusCodes() {
		out.RetriableStatusCodes = append(out.RetriableStatusCodes, int(c))
	}
	if t := rp.GetPerTryTimeout(); t != nil {
		out.PerTryTimeout = dur(durationOf(re, field+".per_try_timeout", t))
	}
	if b := rp.GetRetryBackOff(); b != nil {
		if t := b.GetBaseInterval(); t != nil {
			out.BaseInterval = dur(durationOf(re, field+".retry_back_off.base_interval", t))
		}
		if t := b.GetMaxInterval(); t != nil {
			out.MaxInterval = dur(durationOf(re, field+".retry_back_off.max_interval", t))
		}
	}
	for i, p := range rp.GetRetryHostPredicate() {
		if p.GetName() != "envoy.retry_host_predicates.previous_hosts" {
			re.add("%s.retry_host_predicate[%d].name: %q is not supported", field, i, p.GetName())
		}
	}
	return out
}

func decodeHeaderOps(re *resourceError, rf string, r *routev3.Route) *headerPolicy {
	hp := &headerPolicy{}
	set := func(ops *headerOps, field string, adds []*corev3.HeaderValueOption, removes []string) {
		for i, h := range adds {
			k, v := strings.ToLower(h.GetHeader().GetKey()), h.GetHeader().GetValue()
			if strings.Contains(v, "%") {
				re.add("%s[%d].header.value: %q: %%…%% substitution is not supported", field, i, v)
			}
			switch h.GetAppendAction() {
			case corev3.HeaderValueOption_OVERWRITE_IF_EXISTS_OR_ADD:
				if ops.Set == nil {
					ops.Set = map[string]string{}
				}
				ops.Set[k] = v
			case corev3.HeaderValueOption_APPEND_IF_EXISTS_OR_ADD:
				if ops.Add == nil {
					ops.Add = map[string]string{}
				}
				ops.Add[k] = v
			default:
				re.add("%s[%d].append_action: %s is not supported", field, i, h.GetAppendAction())
			}
		}
		for _, h := range removes {
			ops.Remove = append(ops.Remove, strings.ToLower(h))
		}
	}
	set(&hp.Request, rf+".request_headers_to_add", r.GetRequestHeadersToAdd(), r.GetRequestHeadersToRemove())
	set(&hp.Response, rf+".response_headers_to_add", r.GetResponseHeadersToAdd(), r.GetResponseHeadersToRemove())
	if len(hp.Request.Set)+len(hp.Request.Add)+len(hp.Request.Remove)+len(hp.Response.Set)+len(hp.Response.Add)+len(hp.Response.Remove) == 0 {
		return nil
	}
	return hp
}

func decodeFault(re *resourceError, field string, hf *faultv3.HTTPFault) *fault {
	f := &fault{}
	if d := hf.GetDelay(); d != nil {
		fd := &faultDelay{Percent: 100}
		if t := d.GetFixedDelay(); t != nil {
			fd.Fixed = dur(durationOf(re, field+".delay.fixed_delay", t))
		} else {
			re.add("%s.delay: fixed_delay is required", field)
		}
		if p := d.GetPercentage(); p != nil {
			fd.Percent = percentOf(p)
		}
		f.Delay = fd
	}
	if a := hf.GetAbort(); a != nil {
		fa := &faultAbort{Percent: 100}
		switch e := a.GetErrorType().(type) {
		case *faultv3.FaultAbort_HttpStatus:
			fa.HTTPStatus = int(e.HttpStatus)
		case *faultv3.FaultAbort_GrpcStatus:
			c := int(e.GrpcStatus)
			fa.GRPCStatus = &c
		default:
			re.add("%s.abort: http_status or grpc_status is required", field)
		}
		if p := a.GetPercentage(); p != nil {
			fa.Percent = percentOf(p)
		}
		f.Abort = fa
	}
	if f.Delay == nil && f.Abort == nil {
		return nil
	}
	return f
}

func percentOf(p *typev3.FractionalPercent) float64 {
	n := float64(p.GetNumerator())
	switch p.GetDenominator() {
	case typev3.FractionalPercent_TEN_THOUSAND:
		return n / 100
	case typev3.FractionalPercent_MILLION:
		return n / 10000
	default:
		return n
	}
}

func durationOf(re *resourceError, field string, d *durationpb.Duration) time.Duration {
	if err := d.CheckValid(); err != nil || d.AsDuration() < 0 {
		re.add("%s: invalid duration %v", field, d)
		return 0
	}
	return d.AsDuration()
}

// clusterInfo is what a Cluster contributes to the engine configuration.
type clusterInfo struct {
	cfg cluster
	// eds: the endpoints come from the ClusterLoadAssignment edsName.
	eds     bool
	edsName string
	// skip: the engine implements it itself (ORIGINAL_DST passthrough) or
	// it has no endpoints by design (BlackHoleCluster): not in the table,
	// so a route to it answers 503 NC.
	skip bool
}

const unlimited = 1 << 31

// decodeCluster checks a Cluster against the contract and translates it.
func decodeCluster(c *clusterv3.Cluster) (clusterInfo, error) {
	re := &resourceError{typeURL: ClusterType, name: c.GetName()}
	for _, p := range clusterSchema.check(c) {
		re.add("%s", p)
	}
	info := clusterInfo{cfg: cluster{Name: c.GetName()}}
	cl := &info.cfg
	switch c.GetType() {
	case clusterv3.Cluster_EDS:
		info.eds = true
		info.edsName = c.GetEdsClusterConfig().GetServiceName()
		if info.edsName == "" {
			info.edsName = c.GetName()
		}
		if c.GetEdsClusterConfig().GetEdsConfig().GetAds() == nil {
			re.add("eds_cluster_config.eds_config: only ads {} is supported")
		}
	case clusterv3.Cluster_STATIC:
		eps, err := endpointsOf(re, "load_assignment", c.GetLoadAssignment())
		if err == nil {
			cl.Endpoints = eps
		}
		if len(eps) == 0 {
			info.skip = true
		}
	case clusterv3.Cluster_STRICT_DNS, clusterv3.Cluster_LOGICAL_DNS:
		var addrs []*corev3.SocketAddress
		for _, le := range c.GetLoadAssignment().GetEndpoints() {
			for _, lb := range le.GetLbEndpoints() {
				addrs = append(addrs, lb.GetEndpoint().GetAddress().GetSocketAddress())
			}
		}
		if len(addrs) != 1 {
			re.add("load_assignment: a DNS cluster needs exactly one endpoint (host name and port), got %d", len(addrs))
		} else if pv := addrs[0].GetPortValue(); pv == 0 || pv > 65535 {
			re.add("load_assignment: DNS endpoint %q port %d is not a port", addrs[0].GetAddress(), pv)
		} else {
			cl.DNS = &dnsDiscovery{Name: addrs[0].GetAddress(), Port: uint16(pv)}
			if t := c.GetDnsRefreshRate(); t != nil {
				cl.DNS.Refresh = dur(durationOf(re, "dns_refresh_rate", t))
			}
		}
		switch c.GetDnsLookupFamily() {
		case clusterv3.Cluster_AUTO, clusterv3.Cluster_V4_PREFERRED, clusterv3.Cluster_V4_ONLY, clusterv3.Cluster_ALL:
		default:
			re.add("dns_lookup_family: %s is not supported", c.GetDnsLookupFamily())
		}
	case clusterv3.Cluster_ORIGINAL_DST:
		info.skip = true
		if c.GetLbPolicy() != clusterv3.Cluster_CLUSTER_PROVIDED {
			re.add("lb_policy: %s with type ORIGINAL_DST (want CLUSTER_PROVIDED)", c.GetLbPolicy())
		}
	default:
		re.add("type: %v is not supported", c.GetClusterDiscoveryType())
	}
	if !info.skip || c.GetType() != clusterv3.Cluster_ORIGINAL_DST {
		switch c.GetLbPolicy() {
		case clusterv3.Cluster_ROUND_ROBIN:
			cl.LoadBalancer = "round_robin"
		case clusterv3.Cluster_LEAST_REQUEST:
			cl.LoadBalancer = "least_request"
		default:
			re.add("lb_policy: %s is not supported", c.GetLbPolicy())
		}
	}
	if t := c.GetConnectTimeout(); t != nil {
		cl.Pool.ConnectTimeout = dur(durationOf(re, "connect_timeout", t))
	}
	for i, th := range c.GetCircuitBreakers().GetThresholds() {
		f := fmt.Sprintf("circuit_breakers.thresholds[%d]", i)
		if th.GetPriority() != corev3.RoutingPriority_DEFAULT {
			re.add("%s.priority: %s is not supported (DEFAULT only)", f, th.GetPriority())
			continue
		}
		limit := func(v interface{ GetValue() uint32 }, set bool) int {
			if !set || v.GetValue() >= unlimited {
				return 0
			}
			return int(v.GetValue())
		}
		cl.Pool.MaxConnections = limit(th.GetMaxConnections(), th.GetMaxConnections() != nil)
		cl.Pool.MaxPendingRequests = limit(th.GetMaxPendingRequests(), th.GetMaxPendingRequests() != nil)
		cl.Pool.MaxRequests = limit(th.GetMaxRequests(), th.GetMaxRequests() != nil)
		if r := th.GetMaxRetries(); r != nil && r.GetValue() < unlimited {
			re.add("%s.max_retries: %d: only unlimited is supported", f, r.GetValue())
		}
	}
	for k, v := range c.GetTypedExtensionProtocolOptions() {
		if k != httpOptsKey {
			re.add("typed_extension_protocol_options[%q]: not supported", k)
			continue
		}
		cfg, err := v.UnmarshalNew()
		if err != nil {
			continue
		}
		po, ok := cfg.(*httpv3.HttpProtocolOptions)
		if !ok {
			re.add("typed_extension_protocol_options[%q]: %s is not HttpProtocolOptions", k, v.GetTypeUrl())
			continue
		}
		switch p := po.GetUpstreamProtocolOptions().(type) {
		case *httpv3.HttpProtocolOptions_ExplicitHttpConfig_:
			if p.ExplicitHttpConfig.GetHttp2ProtocolOptions() != nil {
				cl.Protocol = "http2"
			} else {
				cl.Protocol = "http1"
			}
		case *httpv3.HttpProtocolOptions_UseDownstreamProtocolConfig:
			cl.Protocol = "auto"
		}
		if co := po.GetCommonHttpProtocolOptions(); co != nil {
			if t := co.GetIdleTimeout(); t != nil {
				cl.Pool.IdleTimeout = dur(durationOf(re, fmt.Sprintf("typed_extension_protocol_options[%q].common_http_protocol_options.idle_timeout", k), t))
			}
			if co.GetMaxRequestsPerConnection() != nil {
				re.add("typed_extension_protocol_options[%q].common_http_protocol_options.max_requests_per_connection: not supported yet", k)
			}
		}
	}
	if od := c.GetOutlierDetection(); od != nil {
		cl.Outlier = decodeOutlier(re, od)
	}
	if ts := c.GetTransportSocket(); ts != nil {
		cl.TLS = decodeTLS(re, ts)
	}
	if ms := c.GetTransportSocketMatches(); len(ms) > 0 {
		if cl.TLS != nil {
			re.add("transport_socket_matches: not with transport_socket")
		} else {
			cl.TLS = decodeSocketMatches(re, ms)
		}
	}
	return info, re.err()
}

func decodeOutlier(re *resourceError, od *clusterv3.OutlierDetection) *outlier {
	o := &outlier{}
	enforced := func(v interface{ GetValue() uint32 }, set bool) bool { return !set || v.GetValue() > 0 }
	if od.GetConsecutive_5Xx() != nil && enforced(od.GetEnforcingConsecutive_5Xx(), od.GetEnforcingConsecutive_5Xx() != nil) {
		o.Consecutive5xx = int(od.GetConsecutive_5Xx().GetValue())
	}
	if od.GetConsecutiveGatewayFailure() != nil && enforced(od.GetEnforcingConsecutiveGatewayFailure(), od.GetEnforcingConsecutiveGatewayFailure() != nil) {
		o.ConsecutiveGatewayErrors = int(od.GetConsecutiveGatewayFailure().GetValue())
	}
	if od.GetConsecutiveLocalOriginFailure() != nil && od.GetSplitExternalLocalOriginErrors() &&
		enforced(od.GetEnforcingConsecutiveLocalOriginFailure(), od.GetEnforcingConsecutiveLocalOriginFailure() != nil) {
		o.ConsecutiveConnectFailure = int(od.GetConsecutiveLocalOriginFailure().GetValue())
	}
	if t := od.GetBaseEjectionTime(); t != nil {
		o.BaseEjectionTime = dur(durationOf(re, "outlier_detection.base_ejection_time", t))
	}
	if t := od.GetMaxEjectionTime(); t != nil {
		o.MaxEjectionTime = dur(durationOf(re, "outlier_detection.max_ejection_time", t))
	}
	if v := od.GetMaxEjectionPercent(); v != nil {
		o.MaxEjectionPercent = int(v.GetValue())
	}
	if v := od.GetEnforcingSuccessRate(); v != nil && v.GetValue() != 0 {
		re.add("outlier_detection.enforcing_success_rate: %d: success-rate ejection is not supported (0 only)", v.GetValue())
	}
	if o.Consecutive5xx == 0 && o.ConsecutiveGatewayErrors == 0 && o.ConsecutiveConnectFailure == 0 {
		return nil // nothing enforced: no outlier detection
	}
	return o
}

func decodeTLS(re *resourceError, ts *corev3.TransportSocket) *upstreamTLS {
	cfg, err := ts.GetTypedConfig().UnmarshalNew()
	if err != nil {
		return nil
	}
	u, ok := cfg.(*tlsv3.UpstreamTlsContext)
	if !ok {
		re.add("transport_socket.typed_config: %s is not an UpstreamTlsContext", ts.GetTypedConfig().GetTypeUrl())
		return nil
	}
	if isIstioMutual(u) {
		return decodeIstioMutual(re, "transport_socket", u)
	}
	t := &upstreamTLS{Mode: "SIMPLE", SNI: u.GetSni()}
	ctx := u.GetCommonTlsContext()
	if vc := ctx.GetValidationContext(); vc != nil {
		t.CACertificates = vc.GetTrustedCa().GetFilename()
		for i, san := range vc.GetMatchTypedSubjectAltNames() {
			exact := san.GetMatcher().GetExact()
			if exact == "" {
				re.add("transport_socket.typed_config.common_tls_context.validation_context.match_typed_subject_alt_names[%d].matcher: exact is required", i)
			}
			t.SubjectAltNames = append(t.SubjectAltNames, exact)
		}
	} else {
		t.InsecureSkipVerify = true
	}
	switch v := ctx.GetTlsParams().GetTlsMinimumProtocolVersion(); v {
	case tlsv3.TlsParameters_TLS_AUTO, tlsv3.TlsParameters_TLSv1_2:
	case tlsv3.TlsParameters_TLSv1_3:
		t.MinProtocolVersion = "TLSV1_3"
	default:
		re.add("transport_socket.typed_config.common_tls_context.tls_params.tls_minimum_protocol_version: %s is not supported", v)
	}
	if certs := ctx.GetTlsCertificates(); len(certs) > 0 {
		if len(certs) > 1 {
			re.add("transport_socket.typed_config.common_tls_context.tls_certificates: one certificate only")
		}
		t.Mode = "MUTUAL"
		t.ClientCertificate = certs[0].GetCertificateChain().GetFilename()
		t.PrivateKey = certs[0].GetPrivateKey().GetFilename()
	}
	return t
}

// decodeEndpoints checks a ClusterLoadAssignment and returns the endpoints
// that take new requests (HEALTHY or UNKNOWN; DRAINING and UNHEALTHY ones
// are left out, so only requests already on them finish there).
func decodeEndpoints(cla *endpointv3.ClusterLoadAssignment) ([]endpoint, error) {
	re := &resourceError{typeURL: EndpointType, name: cla.GetClusterName()}
	for _, p := range claSchema.check(cla) {
		re.add("%s", p)
	}
	eps, _ := endpointsOf(re, "", cla)
	return eps, re.err()
}

func endpointsOf(re *resourceError, prefix string, cla *endpointv3.ClusterLoadAssignment) ([]endpoint, error) {
	var eps []endpoint
	seen := map[string]bool{}
	n := len(re.problems)
	for i, le := range cla.GetEndpoints() {
		for j, lb := range le.GetLbEndpoints() {
			f := join(prefix, fmt.Sprintf("endpoints[%d].lb_endpoints[%d]", i, j))
			if w := lb.GetLoadBalancingWeight(); w != nil && w.GetValue() != 1 {
				re.add("%s.load_balancing_weight: %d: endpoint weights are not supported (1 only)", f, w.GetValue())
			}
			sa := lb.GetEndpoint().GetAddress().GetSocketAddress()
			ip, err := netip.ParseAddr(sa.GetAddress())
			if err != nil || sa.GetPortValue() == 0 || sa.GetPortValue() > 65535 {
				re.add("%s.endpoint.address.socket_address: %q port %d is not an IP address and port", f, sa.GetAddress(), sa.GetPortValue())
				continue
			}
			switch lb.GetHealthStatus() {
			case corev3.HealthStatus_UNKNOWN, corev3.HealthStatus_HEALTHY:
			case corev3.HealthStatus_DRAINING, corev3.HealthStatus_UNHEALTHY, corev3.HealthStatus_TIMEOUT, corev3.HealthStatus_DEGRADED:
				continue
			}
			addr := netip.AddrPortFrom(ip, uint16(sa.GetPortValue())).String()
			if seen[addr] {
				continue
			}
			seen[addr] = true
			eps = append(eps, endpoint{Address: addr, Labels: lbLabels(lb), TLSMode: endpointTLSMode(lb)})
		}
	}
	sort.Slice(eps, func(a, b int) bool { return eps[a].Address < eps[b].Address })
	if len(re.problems) > n {
		return nil, errors.New("invalid endpoints")
	}
	return eps, nil
}

// lbLabels returns the endpoint's labels (filter_metadata["envoy.lb"]).
func lbLabels(lb *endpointv3.LbEndpoint) map[string]string {
	md := lb.GetMetadata().GetFilterMetadata()["envoy.lb"]
	if md == nil {
		return nil
	}
	out := map[string]string{}
	for k, v := range md.GetFields() {
		out[k] = v.GetStringValue()
	}
	return out
}
