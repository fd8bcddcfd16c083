package xds

import (
	"github.com/meshlet/meshlet/proxy/xds/xdstest"

	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	faultv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// TestTranslationIsValidEngineConfig: what the contract's resources
// translate to passes the engine's own validation.
func TestTranslationIsValidEngineConfig(t *testing.T) {
	r := newResources()
	for typ, list := range reviews.Resources() {
		for _, m := range list {
			a, _ := anypb.New(m)
			e, err := decode(typ, a, "1", time.Now(), nil)
			if err != nil {
				t.Fatal(err)
			}
			r[typ].entries[e.name] = e
			r[typ].received = true
		}
	}
	tbl := assemble(engineConfig{}, r, nil)
	if !tbl.complete() {
		t.Fatalf("warming: %v %v", tbl.warmingClusters, tbl.warmingRoutes)
	}
	if err := tbl.cfg.Validate(); err != nil {
		t.Fatalf("engine validation: %v", err)
	}
}

// TestNACKMessages: each unsupported field or value is refused with the
// resource and the field path, in the contract's format.
func TestNACKMessages(t *testing.T) {
	route := func(edit func(r *routev3.Route)) proto.Message {
		rc := reviews.Resources()[resource.RouteType][0].(*routev3.RouteConfiguration)
		rc = proto.Clone(rc).(*routev3.RouteConfiguration)
		edit(rc.VirtualHosts[0].Routes[0])
		return rc
	}
	clusterWith := func(edit func(c *clusterv3.Cluster)) proto.Message {
		c := xdstest.EDSCluster(reviews.ClusterName("v1"))
		edit(c)
		return c
	}
	for _, tc := range []struct {
		name, typ string
		res       proto.Message
		want      string
	}{
		{"ring hash", ClusterType, clusterWith(func(c *clusterv3.Cluster) { c.LbPolicy = clusterv3.Cluster_RING_HASH }),
			"Cluster outbound|9080|v1|reviews.shop.svc.cluster.local: lb_policy: RING_HASH is not supported"},
		{"panic threshold", ClusterType, clusterWith(func(c *clusterv3.Cluster) {
			c.CommonLbConfig = &clusterv3.Cluster_CommonLbConfig{HealthyPanicThreshold: &typev3.Percent{Value: 50}}
		}), "Cluster outbound|9080|v1|reviews.shop.svc.cluster.local: common_lb_config: not supported"},
		{"max retries", ClusterType, clusterWith(func(c *clusterv3.Cluster) {
			c.CircuitBreakers = &clusterv3.CircuitBreakers{Thresholds: []*clusterv3.CircuitBreakers_Thresholds{{MaxRetries: wrapperspb.UInt32(3)}}}
		}), "circuit_breakers.thresholds[0].max_retries: 3: only unlimited is supported"},
		{"query parameters", RouteType, route(func(r *routev3.Route) {
			r.Match.QueryParameters = []*routev3.QueryParameterMatcher{{Name: "a"}}
		}), "RouteConfiguration 9080: virtual_hosts[0].routes[0].match.query_parameters: not supported"},
		{"invert match", RouteType, route(func(r *routev3.Route) {
			r.Match.Headers = []*routev3.HeaderMatcher{{Name: "x", InvertMatch: true, HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: true}}}
		}), "virtual_hosts[0].routes[0].match.headers[0].invert_match: not supported"},
		{"case insensitive", RouteType, route(func(r *routev3.Route) { r.Match.CaseSensitive = wrapperspb.Bool(false) }),
			"virtual_hosts[0].routes[0].match.case_sensitive: not supported"},
		{"regex rewrite", RouteType, route(func(r *routev3.Route) {
			r.GetRoute().RegexRewrite = &matcherv3.RegexMatchAndSubstitute{Pattern: &matcherv3.RegexMatcher{Regex: "^/a"}, Substitution: "/b"}
		}), "virtual_hosts[0].routes[0].route.regex_rewrite: not supported"},
		{"redirect", RouteType, route(func(r *routev3.Route) {
			r.Action = &routev3.Route_Redirect{Redirect: &routev3.RedirectAction{HostRedirect: "x"}}
		}), "virtual_hosts[0].routes[0].redirect: not supported"},
		{"two mirrors", RouteType, route(func(r *routev3.Route) {
			r.GetRoute().RequestMirrorPolicies = []*routev3.RouteAction_RequestMirrorPolicy{{Cluster: "a"}, {Cluster: "b"}}
		}), "virtual_hosts[0].routes[0].route.request_mirror_policies: 2 policies; only one is supported"},
		{"deprecated fault percent", RouteType, route(func(r *routev3.Route) {
			r.TypedPerFilterConfig = map[string]*anypb.Any{filterFault: xdstest.MustAny(&faultv3.HTTPFault{MaxActiveFaults: wrapperspb.UInt32(1)})}
		}), `virtual_hosts[0].routes[0].typed_per_filter_config["envoy.filters.http.fault"].max_active_faults: not supported`},
		{"unknown typed config", RouteType, route(func(r *routev3.Route) {
			r.TypedPerFilterConfig = map[string]*anypb.Any{filterFault: xdstest.MustAny(&corev3.Node{})}
		}), "typed config type.googleapis.com/envoy.config.core.v3.Node is not supported"},
		{"listener port out of range", ListenerType, xdstest.HTTPListener(70000, "9080"),
			"Listener 0.0.0.0_70000: address.socket_address.port_value: 70000 is not a port"},
		{"DNS cluster port out of range", ClusterType, clusterWith(func(c *clusterv3.Cluster) {
			c.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STRICT_DNS}
			c.EdsClusterConfig = nil
			c.LoadAssignment = xdstest.CLA(c.Name, "reviews.shop.svc.cluster.local:9080")
			c.LoadAssignment.Endpoints[0].LbEndpoints[0].GetEndpoint().GetAddress().GetSocketAddress().PortSpecifier = &corev3.SocketAddress_PortValue{PortValue: 70000}
		}), `load_assignment: DNS endpoint "reviews.shop.svc.cluster.local" port 70000 is not a port`},
		{"rbac on an outbound listener", ListenerType, withHTTPRBAC(xdstest.HTTPListener(9080, "9080"), &rbachttpv3.RBAC{}),
			`Listener 0.0.0.0_9080: filter_chains[0].filters[0].typed_config.http_filters[0].name: "envoy.filters.http.rbac" is only supported on the inbound listener`},
		{"rbac shadow rules", ListenerType, func() proto.Message {
			l := withHTTPRBAC(xdstest.HTTPListener(9080, "9080"), &rbachttpv3.RBAC{ShadowRules: &rbacv3.RBAC{}})
			l.Name, l.TrafficDirection = "virtualInbound", corev3.TrafficDirection_INBOUND
			return l
		}(), "http_filters[0].typed_config.shadow_rules: not supported"},
		{"endpoint weight", EndpointType, func() proto.Message {
			c := xdstest.CLA("x", "127.0.0.1:1")
			c.Endpoints[0].LbEndpoints[0].LoadBalancingWeight = wrapperspb.UInt32(3)
			return c
		}(), "ClusterLoadAssignment x: endpoints[0].lb_endpoints[0].load_balancing_weight: 3: endpoint weights are not supported (1 only)"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, err := anypb.New(tc.res)
			if err != nil {
				t.Fatal(err)
			}
			_, err = decode(tc.typ, a, "1", time.Now(), nil)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v\nwant it to contain %q", err, tc.want)
			}
		})
	}
}

// withHTTPRBAC puts an RBAC HTTP filter before the router of l's first
// chain.
func withHTTPRBAC(l *listenerv3.Listener, cfg *rbachttpv3.RBAC) *listenerv3.Listener {
	f := l.FilterChains[0].Filters[0]
	hcm := &hcmv3.HttpConnectionManager{}
	if err := f.GetTypedConfig().UnmarshalTo(hcm); err != nil {
		panic(err)
	}
	hcm.HttpFilters = append([]*hcmv3.HttpFilter{{Name: filterHTTPRBAC, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: xdstest.MustAny(cfg)}}}, hcm.HttpFilters...)
	f.ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: xdstest.MustAny(hcm)}
	return l
}
