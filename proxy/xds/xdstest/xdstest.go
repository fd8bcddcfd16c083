// Package xdstest serves xDS to tests: a real go-control-plane ADS server
// on loopback and builders of the resources meshlet discovery emits.
package xdstest

import (
	"context"
	"fmt"
	"maps"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Server is a real go-control-plane ADS server (snapshot cache, SotW and
// delta) on a loopback port, serving one node.
type Server struct {
	// Cache holds the node's snapshot.
	Cache cache.SnapshotCache
	// Addr is the server's host:port.
	Addr string
	node string
	srv  *grpc.Server

	mu    sync.Mutex
	nacks []string // error_detail messages received
	acks  int
}

// StartServer serves on addr ("": a free loopback port) until the test
// ends; node is the node id whose snapshot Set replaces.
func StartServer(t testing.TB, addr, node string) *Server {
	t.Helper()
	return StartServerWith(t, addr, node)
}

// StartServerWith is StartServer with gRPC server options (TLS credentials,
// interceptors).
func StartServerWith(t testing.TB, addr, node string, opts ...grpc.ServerOption) *Server {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c := &Server{Cache: cache.NewSnapshotCache(true, cache.IDHash{}, nil), Addr: ln.Addr().String(), node: node}
	record := func(detail string, nonce string) {
		c.mu.Lock()
		defer c.mu.Unlock()
		if detail != "" {
			c.nacks = append(c.nacks, detail)
		} else if nonce != "" {
			c.acks++
		}
	}
	cb := server.CallbackFuncs{
		StreamRequestFunc: func(_ int64, r *discoveryv3.DiscoveryRequest) error {
			record(r.GetErrorDetail().GetMessage(), r.GetResponseNonce())
			return nil
		},
		StreamDeltaRequestFunc: func(_ int64, r *discoveryv3.DeltaDiscoveryRequest) error {
			record(r.GetErrorDetail().GetMessage(), r.GetResponseNonce())
			return nil
		},
	}
	ctx, cancel := context.WithCancel(context.Background())
	xs := server.NewServer(ctx, c.Cache, cb)
	c.srv = grpc.NewServer(opts...)
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(c.srv, xs)
	go func() { _ = c.srv.Serve(ln) }()
	t.Cleanup(func() { c.srv.Stop(); cancel() })
	return c
}

// Stop stops the server at once (streams end).
func (c *Server) Stop() { c.srv.Stop() }

// Set replaces the node's snapshot with rs at version.
func (c *Server) Set(t testing.TB, version string, rs map[resource.Type][]types.Resource) {
	t.Helper()
	snap, err := cache.NewSnapshot(version, rs)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Cache.SetSnapshot(context.Background(), c.node, snap); err != nil {
		t.Fatal(err)
	}
}

// NACKs returns the error_detail messages the server received.
func (c *Server) NACKs() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.nacks...)
}

// Mesh describes one service on one port with weighted subsets, the way
// meshlet discovery emits it (docs/xds.md).
type Mesh struct {
	Host    string // FQDN
	Port    uint32
	Subsets map[string][]string // subset → endpoint ip:port
	Weights map[string]uint32   // subset → weight
	VIP     string
}

// ClusterName is the subset's cluster, outbound|PORT|SUBSET|FQDN.
func (m Mesh) ClusterName(subset string) string {
	return fmt.Sprintf("outbound|%d|%s|%s", m.Port, subset, m.Host)
}

// Clone returns a copy whose maps can be changed.
func (m Mesh) Clone() Mesh {
	m.Subsets, m.Weights = maps.Clone(m.Subsets), maps.Clone(m.Weights)
	return m
}

// Resources returns the clusters, endpoints, listener and route
// configuration of m, plus the allow_any virtual host.
func (m Mesh) Resources() map[resource.Type][]types.Resource {
	rs := map[resource.Type][]types.Resource{}
	var wcs []*routev3.WeightedCluster_ClusterWeight
	for _, s := range slices.Sorted(maps.Keys(m.Subsets)) {
		name := m.ClusterName(s)
		rs[resource.ClusterType] = append(rs[resource.ClusterType], EDSCluster(name))
		rs[resource.EndpointType] = append(rs[resource.EndpointType], CLA(name, m.Subsets[s]...))
		if w, ok := m.Weights[s]; ok {
			wcs = append(wcs, &routev3.WeightedCluster_ClusterWeight{Name: name, Weight: wrapperspb.UInt32(w)})
		}
	}
	rn := fmt.Sprint(m.Port)
	rs[resource.ListenerType] = []types.Resource{HTTPListener(m.Port, rn)}
	domains := []string{m.Host, fmt.Sprintf("%s:%d", m.Host, m.Port)}
	if m.VIP != "" {
		domains = append(domains, m.VIP, fmt.Sprintf("%s:%d", m.VIP, m.Port))
	}
	rs[resource.RouteType] = []types.Resource{&routev3.RouteConfiguration{
		Name: rn,
		VirtualHosts: []*routev3.VirtualHost{{
			Name:    fmt.Sprintf("%s:%d", m.Host, m.Port),
			Domains: domains,
			Routes: []*routev3.Route{{
				Name:  "default",
				Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_Route{Route: &routev3.RouteAction{
					ClusterSpecifier: &routev3.RouteAction_WeightedClusters{WeightedClusters: &routev3.WeightedCluster{Clusters: wcs}},
					Timeout:          durationpb.New(0),
				}},
			}},
		}, {
			Name:    "allow_any",
			Domains: []string{"*"},
			Routes: []*routev3.Route{{
				Name:   "allow_any",
				Match:  &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: "PassthroughCluster"}}},
			}},
		}},
	}}
	return rs
}

// EDSCluster is an EDS-over-ADS cluster, round robin.
func EDSCluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{
			EdsConfig:   &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}, ResourceApiVersion: corev3.ApiVersion_V3},
			ServiceName: name,
		},
		ConnectTimeout: durationpb.New(2 * time.Second),
		LbPolicy:       clusterv3.Cluster_ROUND_ROBIN,
	}
}

// CLA is a ClusterLoadAssignment of healthy endpoints.
func CLA(name string, addrs ...string) *endpointv3.ClusterLoadAssignment {
	var lbs []*endpointv3.LbEndpoint
	for _, a := range addrs {
		host, port, _ := net.SplitHostPort(a)
		var p uint32
		_, _ = fmt.Sscan(port, &p) // a malformed port stays 0, which the proxy refuses
		lbs = append(lbs, &endpointv3.LbEndpoint{
			HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
				SocketAddress: &corev3.SocketAddress{Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: p}}}}}},
			HealthStatus: corev3.HealthStatus_HEALTHY,
		})
	}
	return &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{LbEndpoints: lbs, LoadBalancingWeight: wrapperspb.UInt32(1)}}}
}

// HTTPListener is the 0.0.0.0_PORT listener using route configuration
// routeName over ADS.
func HTTPListener(port uint32, routeName string) *listenerv3.Listener {
	hcm := &hcmv3.HttpConnectionManager{
		StatPrefix: "outbound_0.0.0.0_" + routeName,
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{
			ConfigSource:    &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}, ResourceApiVersion: corev3.ApiVersion_V3},
			RouteConfigName: routeName,
		}},
		HttpFilters: []*hcmv3.HttpFilter{{Name: "envoy.filters.http.router", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: MustAny(&routerv3.Router{})}}},
	}
	return &listenerv3.Listener{
		Name: fmt.Sprintf("0.0.0.0_%d", port),
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: "0.0.0.0", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}},
		BindToPort:       wrapperspb.Bool(false),
		TrafficDirection: corev3.TrafficDirection_OUTBOUND,
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{
			Name: "envoy.filters.network.http_connection_manager", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: MustAny(hcm)},
		}}}},
	}
}

// MustAny wraps m in an Any, panicking if it cannot be marshalled.
func MustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(err)
	}
	return a
}
