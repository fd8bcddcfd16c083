package xds

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

// testNode is the node id every test client uses.
var testIdentity = Identity{PodName: "client-0", Namespace: "shop", IP: "127.0.0.1", ServiceAccount: "client", Labels: map[string]string{"app": "client"}}

// cp is a real go-control-plane ADS server (snapshot cache, SotW and
// delta) on a loopback port.
type cp struct {
	cache cache.SnapshotCache
	addr  string
	srv   *grpc.Server

	mu    sync.Mutex
	nacks []string // error_detail messages received
	acks  int
}

func startCP(t testing.TB, addr string) *cp {
	t.Helper()
	if addr == "" {
		addr = "127.0.0.1:0"
	}
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	c := &cp{cache: cache.NewSnapshotCache(true, cache.IDHash{}, nil), addr: ln.Addr().String()}
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
	xs := server.NewServer(ctx, c.cache, cb)
	c.srv = grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(c.srv, xs)
	go func() { _ = c.srv.Serve(ln) }()
	t.Cleanup(func() { c.srv.Stop(); cancel() })
	return c
}

func (c *cp) stop() { c.srv.Stop() }

func (c *cp) set(t testing.TB, version string, rs map[resource.Type][]types.Resource) {
	t.Helper()
	snap, err := cache.NewSnapshot(version, rs)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.cache.SetSnapshot(context.Background(), testIdentity.NodeID(), snap); err != nil {
		t.Fatal(err)
	}
}

func (c *cp) nackMessages() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]string(nil), c.nacks...)
}

// mesh describes one service on one port with weighted subsets, the way
// meshlet discovery emits it (docs/xds.md).
type mesh struct {
	host    string // FQDN
	port    uint32
	subsets map[string][]string // subset → endpoint ip:port
	weights map[string]uint32   // subset → weight
	vip     string
}

func (m mesh) clusterName(subset string) string {
	return fmt.Sprintf("outbound|%d|%s|%s", m.port, subset, m.host)
}

func (m mesh) resources() map[resource.Type][]types.Resource {
	rs := map[resource.Type][]types.Resource{}
	var wcs []*routev3.WeightedCluster_ClusterWeight
	for _, s := range slices.Sorted(maps.Keys(m.subsets)) {
		name := m.clusterName(s)
		rs[resource.ClusterType] = append(rs[resource.ClusterType], edsCluster(name))
		rs[resource.EndpointType] = append(rs[resource.EndpointType], cla(name, m.subsets[s]...))
		if w, ok := m.weights[s]; ok {
			wcs = append(wcs, &routev3.WeightedCluster_ClusterWeight{Name: name, Weight: wrapperspb.UInt32(w)})
		}
	}
	rn := fmt.Sprint(m.port)
	rs[resource.ListenerType] = []types.Resource{httpListener(m.port, rn)}
	domains := []string{m.host, fmt.Sprintf("%s:%d", m.host, m.port)}
	if m.vip != "" {
		domains = append(domains, m.vip, fmt.Sprintf("%s:%d", m.vip, m.port))
	}
	rs[resource.RouteType] = []types.Resource{&routev3.RouteConfiguration{
		Name: rn,
		VirtualHosts: []*routev3.VirtualHost{{
			Name:    fmt.Sprintf("%s:%d", m.host, m.port),
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
				Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: passthroughCluster}}},
			}},
		}},
	}}
	return rs
}

func edsCluster(name string) *clusterv3.Cluster {
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

func cla(name string, addrs ...string) *endpointv3.ClusterLoadAssignment {
	var lbs []*endpointv3.LbEndpoint
	for _, a := range addrs {
		host, port, _ := net.SplitHostPort(a)
		var p uint32
		fmt.Sscan(port, &p)
		lbs = append(lbs, &endpointv3.LbEndpoint{
			HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
				SocketAddress: &corev3.SocketAddress{Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: p}}}}}},
			HealthStatus: corev3.HealthStatus_HEALTHY,
		})
	}
	return &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{LbEndpoints: lbs, LoadBalancingWeight: wrapperspb.UInt32(1)}}}
}

func httpListener(port uint32, routeName string) *listenerv3.Listener {
	hcm := &hcmv3.HttpConnectionManager{
		StatPrefix: "outbound_0.0.0.0_" + routeName,
		CodecType:  hcmv3.HttpConnectionManager_AUTO,
		RouteSpecifier: &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{
			ConfigSource:    &corev3.ConfigSource{ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}, ResourceApiVersion: corev3.ApiVersion_V3},
			RouteConfigName: routeName,
		}},
		HttpFilters: []*hcmv3.HttpFilter{{Name: filterRouter, ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(&routerv3.Router{})}}},
	}
	return &listenerv3.Listener{
		Name: fmt.Sprintf("0.0.0.0_%d", port),
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: "0.0.0.0", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}},
		BindToPort:       wrapperspb.Bool(false),
		TrafficDirection: corev3.TrafficDirection_OUTBOUND,
		FilterChains: []*listenerv3.FilterChain{{Filters: []*listenerv3.Filter{{
			Name: filterHCM, ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(hcm)},
		}}}},
	}
}

func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		panic(err)
	}
	return a
}

// recorder is an Applier that keeps every configuration it was given and
// can be told to refuse.
type recorder struct {
	mu      sync.Mutex
	cfgs    []engineConfig
	refuse  error
	applied chan struct{}
}

func newRecorder() *recorder { return &recorder{applied: make(chan struct{}, 1000)} }

func (r *recorder) Apply(cfg engineConfig) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.refuse != nil {
		return r.refuse
	}
	r.cfgs = append(r.cfgs, cfg)
	r.applied <- struct{}{}
	return nil
}

func (r *recorder) last() engineConfig {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.cfgs) == 0 {
		return engineConfig{}
	}
	return r.cfgs[len(r.cfgs)-1]
}

// runClient runs a client until the test ends or the returned stop is
// called (which waits for Run to return).
func runClient(t testing.TB, o Options) (*Client, func()) {
	t.Helper()
	if o.Node == nil {
		o.Node = testIdentity.Node()
	}
	if o.BackoffInitial == 0 {
		o.BackoffInitial = 20 * time.Millisecond
		o.BackoffMax = 200 * time.Millisecond
	}
	c, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.Run(ctx); close(done) }()
	stop := func() { cancel(); <-done }
	t.Cleanup(stop)
	return c, stop
}

func waitFor(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
