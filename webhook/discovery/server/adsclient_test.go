package server

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
)

// adsClient is a raw state-of-the-world ADS client that behaves like Envoy:
// it subscribes to CDS and LDS (wildcard), then to the EDS and RDS names
// they name, and ACKs every response unless nack says otherwise.
type adsClient struct {
	t      testing.TB
	conn   *grpc.ClientConn
	stream discoverygrpc.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	node   *corev3.Node

	mu    sync.Mutex
	cond  *sync.Cond
	state map[string]*typeView
	err   error
	// nacked are the versions this client rejected, by type; repeats counts
	// responses that sent one of them again.
	nacked  map[string]map[string]bool
	repeats int
	// nack, if set, decides whether to reject a response (non-empty message).
	nack func(typeURL string, resp *discoverygrpc.DiscoveryResponse) string
}

type typeView struct {
	version   string // accepted
	resources map[string]proto.Message
	responses int
	names     []string // subscribed (EDS/RDS)
}

func testNode(ip, pod, ns string, meta map[string]any) *corev3.Node {
	fields := map[string]any{"NAMESPACE": ns, "NAME": pod}
	for k, v := range meta {
		fields[k] = v
	}
	md, err := structpb.NewStruct(fields)
	if err != nil {
		panic(err)
	}
	return &corev3.Node{Id: fmt.Sprintf("sidecar~%s~%s.%s~%s.svc.cluster.local", ip, pod, ns, ns), Metadata: md}
}

func dialADS(t testing.TB, addr string, node *corev3.Node, nack func(string, *discoverygrpc.DiscoveryResponse) string) *adsClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c := &adsClient{t: t, conn: conn, stream: stream, node: node, state: map[string]*typeView{}, nack: nack,
		nacked: map[string]map[string]bool{}}
	c.cond = sync.NewCond(&c.mu)
	t.Cleanup(func() { cancel(); conn.Close() })
	for _, typ := range []string{resourcev3.ClusterType, resourcev3.ListenerType} {
		c.state[typ] = &typeView{resources: map[string]proto.Message{}}
		if err := stream.Send(&discoverygrpc.DiscoveryRequest{Node: node, TypeUrl: typ}); err != nil {
			t.Fatal(err)
		}
	}
	go c.loop()
	return c
}

func (c *adsClient) loop() {
	for {
		resp, err := c.stream.Recv()
		if err != nil {
			c.mu.Lock()
			c.err = err
			c.cond.Broadcast()
			c.mu.Unlock()
			return
		}
		typ := resp.GetTypeUrl()
		msgs := map[string]proto.Message{}
		for _, a := range resp.GetResources() {
			m, err := a.UnmarshalNew()
			if err != nil {
				c.t.Errorf("decoding %s: %v", typ, err)
				continue
			}
			msgs[resourceName(m)] = m
		}
		reject := ""
		if c.nack != nil {
			reject = c.nack(typ, resp)
		}
		c.mu.Lock()
		v := c.state[typ]
		if v == nil {
			v = &typeView{resources: map[string]proto.Message{}}
			c.state[typ] = v
		}
		req := &discoverygrpc.DiscoveryRequest{TypeUrl: typ, ResponseNonce: resp.GetNonce(), ResourceNames: v.names}
		var follow *discoverygrpc.DiscoveryRequest
		if c.nacked[typ][resp.GetVersionInfo()] {
			c.repeats++
		}
		if reject != "" {
			if c.nacked[typ] == nil {
				c.nacked[typ] = map[string]bool{}
			}
			c.nacked[typ][resp.GetVersionInfo()] = true
			req.VersionInfo = v.version
			req.ErrorDetail = &rpcstatus.Status{Code: 3, Message: reject}
		} else {
			v.version, v.resources = resp.GetVersionInfo(), msgs
			req.VersionInfo = v.version
			follow = c.subscribeDependents(typ, msgs)
		}
		v.responses++
		c.cond.Broadcast()
		c.mu.Unlock()
		if err := c.stream.Send(req); err != nil {
			return
		}
		if follow != nil {
			if err := c.stream.Send(follow); err != nil {
				return
			}
		}
	}
}

// subscribeDependents returns the EDS (RDS) request for the names a new
// CDS (LDS) response names, when they changed. Called with c.mu held.
func (c *adsClient) subscribeDependents(typ string, msgs map[string]proto.Message) *discoverygrpc.DiscoveryRequest {
	var dep string
	var names []string
	switch typ {
	case resourcev3.ClusterType:
		dep = resourcev3.EndpointType
		for _, m := range msgs {
			if cl := m.(*clusterv3.Cluster); cl.GetType() == clusterv3.Cluster_EDS {
				names = append(names, cl.GetEdsClusterConfig().GetServiceName())
			}
		}
	case resourcev3.ListenerType:
		dep = resourcev3.RouteType
		for _, m := range msgs {
			names = append(names, rdsNames(m.(*listenerv3.Listener))...)
		}
	default:
		return nil
	}
	sort.Strings(names)
	v := c.state[dep]
	if v == nil {
		v = &typeView{resources: map[string]proto.Message{}}
		c.state[dep] = v
	}
	if fmt.Sprint(v.names) == fmt.Sprint(names) && v.responses > 0 {
		return nil
	}
	v.names = names
	return &discoverygrpc.DiscoveryRequest{TypeUrl: dep, ResourceNames: names, VersionInfo: v.version}
}

func rdsNames(l *listenerv3.Listener) []string {
	var out []string
	chains := append([]*listenerv3.FilterChain{}, l.GetFilterChains()...)
	if l.GetDefaultFilterChain() != nil {
		chains = append(chains, l.GetDefaultFilterChain())
	}
	for _, fc := range chains {
		for _, f := range fc.GetFilters() {
			h := &hcmv3.HttpConnectionManager{}
			if f.GetTypedConfig().UnmarshalTo(h) == nil && h.GetRds() != nil {
				out = append(out, h.GetRds().GetRouteConfigName())
			}
		}
	}
	if a := l.GetApiListener().GetApiListener(); a != nil {
		h := &hcmv3.HttpConnectionManager{}
		if a.UnmarshalTo(h) == nil && h.GetRds() != nil {
			out = append(out, h.GetRds().GetRouteConfigName())
		}
	}
	return out
}

func resourceName(m proto.Message) string {
	switch r := m.(type) {
	case *clusterv3.Cluster:
		return r.GetName()
	case *listenerv3.Listener:
		return r.GetName()
	case *routev3.RouteConfiguration:
		return r.GetName()
	case *endpointv3.ClusterLoadAssignment:
		return r.GetClusterName()
	}
	return ""
}

// waitFor waits until pred holds for the accepted resources of typ.
func (c *adsClient) waitFor(t testing.TB, typ, what string, pred func(map[string]proto.Message) bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	timer := time.AfterFunc(20*time.Second, func() { c.mu.Lock(); c.cond.Broadcast(); c.mu.Unlock() })
	defer timer.Stop()
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		if v := c.state[typ]; v != nil && pred(v.resources) {
			return
		}
		if c.err != nil {
			t.Fatalf("waiting for %s: stream ended: %v", what, c.err)
		}
		if time.Now().After(deadline) {
			var names []string
			if v := c.state[typ]; v != nil {
				for n := range v.resources {
					names = append(names, n)
				}
			}
			sort.Strings(names)
			t.Fatalf("timed out waiting for %s; %s has %v", what, typ, names)
		}
		c.cond.Wait()
	}
}

func (c *adsClient) responses(typ string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if v := c.state[typ]; v != nil {
		return v.responses
	}
	return 0
}

func (c *adsClient) totalResponses() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := 0
	for _, v := range c.state {
		n += v.responses
	}
	return n
}

func (c *adsClient) repeatedNACKed() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.repeats
}
