package server

import (
	"context"
	"fmt"
	"maps"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
	"github.com/go-logr/logr"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
	istiofake "istio.io/client-go/pkg/clientset/versioned/fake"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	clientfeatures "k8s.io/client-go/features"
	clientfeaturestesting "k8s.io/client-go/features/testing"
	kubefake "k8s.io/client-go/kubernetes/fake"

	"github.com/meshlet/meshlet/webhook/discovery/translate"
)

func sharedTestResources(weight uint32) *translate.Resources {
	return &translate.Resources{
		Clusters: []*clusterv3.Cluster{{Name: "outbound|80||a.ns.svc.cluster.local", ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
			ConnectTimeout: durationpb.New(time.Duration(weight) * time.Second)}},
		Endpoints: []*endpointv3.ClusterLoadAssignment{{ClusterName: "outbound|80||a.ns.svc.cluster.local", Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "10.0.0.1",
					PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: weight}}}}}}}}}}}},
		Routes: []*routev3.RouteConfiguration{{Name: "80", VirtualHosts: []*routev3.VirtualHost{{Name: "a", Domains: []string{"a"},
			Routes: []*routev3.Route{{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_WeightedClusters{
					WeightedClusters: &routev3.WeightedCluster{Clusters: []*routev3.WeightedCluster_ClusterWeight{
						{Name: "outbound|80||a.ns.svc.cluster.local", Weight: wrapperspb.UInt32(weight)}}}}}}}}}}}},
	}
}

func newSharedTestCache(own bool) (*sharedCache, cachev3.SnapshotCache) {
	sc := cachev3.NewSnapshotCache(true, cachev3.IDHash{}, cacheLogger{logr.Discard()})
	mux := &cachev3.MuxCache{Classify: func(*cachev3.Request) string { return "" },
		ClassifyDelta: func(*cachev3.DeltaRequest) string { return "" }, Caches: map[string]cachev3.Cache{"": sc}}
	return newSharedCache(mux, func(*corev3.Node) bool { return own }), sc
}

func routeRequest(node, version string) *cachev3.Request {
	return &discoverygrpc.DiscoveryRequest{Node: &corev3.Node{Id: node}, TypeUrl: resourcev3.RouteType,
		ResourceNames: []string{"80"}, VersionInfo: version}
}

// synced is the subscription of a stream that holds version v of "80".
func synced(v string) cachev3.Subscription {
	sub := stream.NewSotwSubscription([]string{"80"}, false)
	sub.SetReturnedResources(map[string]string{"80": v})
	return sub
}

func recvNow(t *testing.T, ch chan cachev3.Response) *discoverygrpc.DiscoveryResponse {
	t.Helper()
	select {
	case r := <-ch:
		out, err := r.GetDiscoveryResponse()
		if err != nil {
			t.Fatal(err)
		}
		return out
	default:
		t.Fatal("no response")
		return nil
	}
}

// TestSharedCacheSharesMarshaledResources: the responses of every stream
// that is sent the same built carry that built's one marshaled copy of each
// resource (the same *anypb.Any, not a copy marshaled per response), which
// decodes to the resource; a response is a new message each time (the
// server writes its nonce into it); a watch opened at the current version
// is answered by the next SetSnapshot, with the new built's bytes; a
// cancelled watch is not answered. Both for the watches sharedCache answers
// itself (sidecars) and those the snapshot cache answers (proxyless gRPC).
func TestSharedCacheSharesMarshaledResources(t *testing.T) {
	for _, own := range []bool{true, false} {
		t.Run(fmt.Sprintf("own=%v", own), func(t *testing.T) { testSharedCache(t, own) })
	}
}

func testSharedCache(t *testing.T, own bool) {
	ctx := context.Background()
	c, sc := newSharedTestCache(own)
	b1, err := buildSnapshot(sharedTestResources(10), newInternTable(nil))
	if err != nil {
		t.Fatal(err)
	}
	rc := b1.snap.GetResources(resourcev3.RouteType)["80"]
	want := b1.anys[rc]
	if want == nil {
		t.Fatal("the built holds no marshaled route configuration")
	}
	var got []*discoverygrpc.DiscoveryResponse
	for _, id := range []string{"a", "b"} {
		if err := c.SetSnapshot(ctx, sc, id, b1); err != nil {
			t.Fatal(err)
		}
		ch := make(chan cachev3.Response, 8)
		if _, err := c.CreateWatch(routeRequest(id, ""), stream.NewSotwSubscription([]string{"80"}, false), ch); err != nil {
			t.Fatal(err)
		}
		out := recvNow(t, ch)
		if len(out.GetResources()) != 1 || out.GetResources()[0] != want {
			t.Fatalf("node %s: response resources %v are not the built's marshaled copy", id, out.GetResources())
		}
		got = append(got, out)
	}
	if got[0] == got[1] {
		t.Fatal("two streams were handed the same response message")
	}
	back := &routev3.RouteConfiguration{}
	if err := got[0].GetResources()[0].UnmarshalTo(back); err != nil || !proto.Equal(back, rc) {
		t.Fatalf("the shared bytes decode to %v (%v), want %v", back, err, rc)
	}
	if got[0].GetVersionInfo() != b1.snap.GetVersion(resourcev3.RouteType) || got[0].GetTypeUrl() != resourcev3.RouteType {
		t.Fatalf("version %q type %q", got[0].GetVersionInfo(), got[0].GetTypeUrl())
	}

	// Watches at the current version wait for the next snapshot.
	b2, err := buildSnapshot(sharedTestResources(20), newInternTable(nil))
	if err != nil {
		t.Fatal(err)
	}
	v1 := b1.snap.GetVersion(resourcev3.RouteType)
	waiting := make(chan cachev3.Response, 8)
	if _, err := c.CreateWatch(routeRequest("a", v1), synced(v1), waiting); err != nil {
		t.Fatal(err)
	}
	cancelled := make(chan cachev3.Response, 8)
	cancel, err := c.CreateWatch(routeRequest("b", v1), synced(v1), cancelled)
	if err != nil {
		t.Fatal(err)
	}
	if len(waiting)+len(cancelled) != 0 {
		t.Fatal("a watch at the current version was answered")
	}
	cancel()
	for _, id := range []string{"a", "b"} {
		if err := c.SetSnapshot(ctx, sc, id, b2); err != nil {
			t.Fatal(err)
		}
	}
	out := recvNow(t, waiting)
	if out.GetResources()[0] != b2.anys[b2.snap.GetResources(resourcev3.RouteType)["80"]] || out.GetVersionInfo() == v1 {
		t.Fatalf("the waiting watch got %v at %q, not the new built's bytes", out.GetResources(), out.GetVersionInfo())
	}
	if len(cancelled) != 0 {
		t.Fatal("a cancelled watch was answered")
	}
	for id, n := range c.nodes {
		if len(n.watches)+len(n.sotw) != 0 {
			t.Errorf("node %s: %d answered or cancelled watches are still held", id, len(n.watches)+len(n.sotw))
		}
	}
}

// TestBuildSnapshotInterns: identical resources of two shapes (separate
// objects) become one object with one marshaled copy, in this push and the
// next; the per-resource versions are go-control-plane's own hashes (what
// its ConstructVersionMap computes), so delta clients see no difference.
func TestBuildSnapshotInterns(t *testing.T) {
	t1 := newInternTable(nil)
	a, err := buildSnapshot(sharedTestResources(10), t1)
	if err != nil {
		t.Fatal(err)
	}
	b, err := buildSnapshot(sharedTestResources(10), t1)
	if err != nil {
		t.Fatal(err)
	}
	ra, rb := a.snap.GetResources(resourcev3.RouteType)["80"], b.snap.GetResources(resourcev3.RouteType)["80"]
	if ra != rb || a.anys[ra] != b.anys[rb] {
		t.Fatal("identical route configurations of two shapes are two objects")
	}
	next, err := buildSnapshot(sharedTestResources(10), newInternTable(t1))
	if err != nil {
		t.Fatal(err)
	}
	if next.snap.GetResources(resourcev3.RouteType)["80"] != ra {
		t.Fatal("an unchanged route configuration is a new object in the next push")
	}
	if a.version != b.version {
		t.Fatalf("versions %s and %s of identical shapes differ", a.version, b.version)
	}
	fresh, err := cachev3.NewSnapshot("", sharedTestResources(10).ByType())
	if err != nil {
		t.Fatal(err)
	}
	if err := fresh.ConstructVersionMap(); err != nil {
		t.Fatal(err)
	}
	for _, typ := range []string{resourcev3.ClusterType, resourcev3.RouteType} {
		if got, want := a.snap.GetVersionMap(typ), fresh.GetVersionMap(typ); fmt.Sprint(got) != fmt.Sprint(want) {
			t.Errorf("%s versions %v, go-control-plane computes %v", typ, got, want)
		}
	}
	other, err := buildSnapshot(sharedTestResources(20), t1)
	if err != nil {
		t.Fatal(err)
	}
	if other.version == a.version || other.snap.GetResources(resourcev3.RouteType)["80"] == ra {
		t.Fatal("a different route configuration was interned as the same")
	}
}

// TestConnectingProxiesShareShape: proxies of one shape that connect after
// the last push get that push's snapshot (one object), not one built each.
func TestConnectingProxiesShareShape(t *testing.T) {
	// The fake clientsets serve no watch-list bookmarks: plain LIST + WATCH.
	clientfeaturestesting.SetFeatureDuringTest(t, clientfeatures.WatchListClient, false)
	kube := kubefake.NewClientset(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "reviews", Namespace: "shop"},
			Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.10", ClusterIPs: []string{"10.96.0.10"}, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}})
	srv, err := New(Options{XDSAddr: "127.0.0.1:0", MetricsAddr: "-", Kube: kube, Istio: istiofake.NewSimpleClientset(), Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.Run(ctx)
	<-srv.Ready()
	// Connect between pushes: wait until the informers' first events were
	// pushed and nothing is pending.
	for last := int64(-1); srv.pushes.Load() != last; {
		last = srv.pushes.Load()
		time.Sleep(time.Second)
	}
	var ids []string
	for i := range 3 {
		n := testNode(fmt.Sprintf("10.2.0.%d", i+1), fmt.Sprintf("client-%d", i), "shop", nil)
		c := dialADS(t, srv.XDSAddr().String(), n, nil)
		c.waitFor(t, resourcev3.ClusterType, "the reviews cluster", func(m map[string]proto.Message) bool {
			return m["outbound|80||reviews.shop.svc.cluster.local"] != nil
		})
		ids = append(ids, n.GetId())
	}
	var snaps []cachev3.ResourceSnapshot
	for _, id := range ids {
		s, err := srv.sidecar.GetSnapshot(id)
		if err != nil {
			t.Fatal(err)
		}
		snaps = append(snaps, s)
	}
	if snaps[0] != snaps[1] || snaps[1] != snaps[2] {
		t.Fatal("proxies of one shape that connected between pushes hold separate snapshots")
	}
}

// TestSharedCacheADSRules: the sidecar watches sharedCache answers follow
// the snapshot cache's ADS rules: a request that does not name every
// resource of its type is not answered (and not held: the proxy asks
// again), one that names a resource it was never sent is answered at the
// same version, and the responses one snapshot triggers arrive in type
// order (CDS, EDS, LDS, RDS).
func TestSharedCacheADSRules(t *testing.T) {
	ctx := context.Background()
	c, sc := newSharedTestCache(true)
	b1, err := buildSnapshot(sharedTestResources(10), newInternTable(nil))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetSnapshot(ctx, sc, "a", b1); err != nil {
		t.Fatal(err)
	}
	ch := make(chan cachev3.Response, 8)
	req := &discoverygrpc.DiscoveryRequest{Node: &corev3.Node{Id: "a"}, TypeUrl: resourcev3.RouteType, ResourceNames: []string{"81"}}
	if _, err := c.CreateWatch(req, stream.NewSotwSubscription(req.ResourceNames, false), ch); err != nil {
		t.Fatal(err)
	}
	if len(ch) != 0 || len(c.nodes["a"].sotw) != 0 {
		t.Fatalf("a request naming 81 but not 80 was answered (%d) or held (%d)", len(ch), len(c.nodes["a"].sotw))
	}
	v1 := b1.snap.GetVersion(resourcev3.RouteType)
	fresh := routeRequest("a", v1)
	if _, err := c.CreateWatch(fresh, stream.NewSotwSubscription([]string{"80"}, false), ch); err != nil {
		t.Fatal(err)
	}
	if out := recvNow(t, ch); out.GetVersionInfo() != v1 {
		t.Fatalf("a newly named resource at the current version: got version %q", out.GetVersionInfo())
	}

	for round := range 5 {
		next, err := buildSnapshot(sharedTestResources(uint32(20+round)), newInternTable(nil))
		if err != nil {
			t.Fatal(err)
		}
		for _, typ := range []string{resourcev3.RouteType, resourcev3.EndpointType, resourcev3.ClusterType} {
			names := []string(nil)
			if typ != resourcev3.ClusterType {
				names = slicesSorted(b1.typeResponse(typ).names)
			}
			req := &discoverygrpc.DiscoveryRequest{Node: &corev3.Node{Id: "a"}, TypeUrl: typ, ResourceNames: names,
				VersionInfo: b1.typeResponse(typ).version}
			sub := stream.NewSotwSubscription(names, false)
			sub.SetReturnedResources(maps.Clone(b1.typeResponse(typ).names))
			if _, err := c.CreateWatch(req, sub, ch); err != nil {
				t.Fatal(err)
			}
		}
		if len(ch) != 0 {
			t.Fatalf("round %d: watches at the current version were answered", round)
		}
		if err := c.SetSnapshot(ctx, sc, "a", next); err != nil {
			t.Fatal(err)
		}
		var order []string
		for len(ch) > 0 {
			order = append(order, shortType(recvNow(t, ch).GetTypeUrl()))
		}
		if fmt.Sprint(order) != "[CDS EDS RDS]" {
			t.Fatalf("round %d: responses in order %v", round, order)
		}
		if err := c.SetSnapshot(ctx, sc, "a", b1); err != nil {
			t.Fatal(err)
		}
	}
}

func slicesSorted(m map[string]string) []string { return slices.Sorted(maps.Keys(m)) }

// sortedDelta orders a delta response's resources and removals by name.
func sortedDelta(r *discoverygrpc.DeltaDiscoveryResponse) *discoverygrpc.DeltaDiscoveryResponse {
	r = proto.Clone(r).(*discoverygrpc.DeltaDiscoveryResponse)
	slices.SortFunc(r.Resources, func(a, b *discoverygrpc.Resource) int { return strings.Compare(a.Name, b.Name) })
	slices.Sort(r.RemovedResources)
	return r
}

// TestSharedCacheDelta: a delta response carries the built's marshaled
// copy of each resource and is otherwise the snapshot cache's own (same
// resources, versions, removals: compared with the snapshot cache's
// marshaling of the same response), for a named and a wildcard
// subscription, an update and a removal. These are the watches the
// snapshot cache answers (proxyless gRPC); sidecars' are
// TestSharedCacheOwnDeltaMatchesSnapshotCache's.
func TestSharedCacheDelta(t *testing.T) {
	ctx := context.Background()
	c, sc := newSharedTestCache(false)
	b1, err := buildSnapshot(sharedTestResources(10), newInternTable(nil))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetSnapshot(ctx, sc, "a", b1); err != nil {
		t.Fatal(err)
	}
	check := func(what string, r cachev3.DeltaResponse, b *built) *discoverygrpc.DeltaDiscoveryResponse {
		t.Helper()
		dr, ok := r.(*deltaResponse)
		if !ok {
			t.Fatalf("%s: response %T does not carry the shared bytes", what, r)
		}
		got, _ := dr.GetDeltaDiscoveryResponse()
		want, err := dr.RawDeltaResponse.GetDeltaDiscoveryResponse()
		if err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(sortedDelta(got), sortedDelta(want)) {
			t.Fatalf("%s: shared response\n%v\nthe snapshot cache's\n%v", what, got, want)
		}
		for _, res := range got.GetResources() {
			if !slices.Contains(b.typeResponse(got.GetTypeUrl()).anys, res.GetResource()) {
				t.Fatalf("%s: %s is not the built's marshaled copy", what, res.GetName())
			}
		}
		return got
	}
	// open watches typ with sub (names subscribed, returned what the proxy
	// holds) and returns what it is answered, or nil.
	open := func(typ string, names []string, returned map[string]string) chan cachev3.DeltaResponse {
		ch := make(chan cachev3.DeltaResponse, 8)
		sub := stream.NewDeltaSubscription(names, nil, returned, false)
		req := &discoverygrpc.DeltaDiscoveryRequest{Node: &corev3.Node{Id: "a"}, TypeUrl: typ, ResourceNamesSubscribe: names}
		if returned != nil {
			req.ResponseNonce = "1" // an ACK (a first wildcard request is always answered)
		}
		if _, err := c.CreateDeltaWatch(req, sub, ch); err != nil {
			t.Fatal(err)
		}
		return ch
	}
	recv := func(ch chan cachev3.DeltaResponse) cachev3.DeltaResponse {
		t.Helper()
		select {
		case r := <-ch:
			return r
		default:
			t.Fatal("no delta response")
			return nil
		}
	}
	r := recv(open(resourcev3.RouteType, []string{"80"}, nil))
	if got := check("first RDS", r, b1); len(got.GetResources()) != 1 {
		t.Fatalf("first RDS: %d resources", len(got.GetResources()))
	}
	rdsHeld := r.GetNextVersionMap()
	r = recv(open(resourcev3.ClusterType, []string{"*"}, nil))
	if got := check("first CDS", r, b1); len(got.GetResources()) != 1 {
		t.Fatalf("first CDS: %d resources", len(got.GetResources()))
	}
	cdsHeld := r.GetNextVersionMap()

	// Watches at what the proxy holds: an update of the route is sent; a
	// snapshot without the cluster removes it.
	rds := open(resourcev3.RouteType, []string{"80"}, rdsHeld)
	cds := open(resourcev3.ClusterType, []string{"*"}, cdsHeld)
	if len(rds)+len(cds) != 0 {
		t.Fatal("watches at the held versions were answered")
	}
	b2res := sharedTestResources(20)
	b2res.Clusters, b2res.Endpoints = nil, nil
	b2, err := buildSnapshot(b2res, newInternTable(nil))
	if err != nil {
		t.Fatal(err)
	}
	if err := c.SetSnapshot(ctx, sc, "a", b2); err != nil {
		t.Fatal(err)
	}
	if got := check("updated RDS", recv(rds), b2); len(got.GetResources()) != 1 {
		t.Fatalf("updated RDS: %d resources", len(got.GetResources()))
	}
	if got := check("CDS without the cluster", recv(cds), b2); fmt.Sprint(got.GetRemovedResources()) != "[outbound|80||a.ns.svc.cluster.local]" {
		t.Fatalf("CDS without the cluster removes %v", got.GetRemovedResources())
	}
}

// deltaSim plays the delta server's part for one stream over a cache
// (processDelta: a request cancels the type's watch, updates its
// subscription and opens a new one; a response sets the subscription's
// returned resources to its version map).
type deltaSim struct {
	t      *testing.T
	node   string
	watch  func(*cachev3.DeltaRequest, cachev3.Subscription, chan cachev3.DeltaResponse) (func(), error)
	ch     chan cachev3.DeltaResponse
	subs   map[string]*stream.Subscription
	cancel map[string]func()
	nonces map[string]string
	n      int
}

func newDeltaSim(t *testing.T, node string, watch func(*cachev3.DeltaRequest, cachev3.Subscription, chan cachev3.DeltaResponse) (func(), error)) *deltaSim {
	return &deltaSim{t: t, node: node, watch: watch, ch: make(chan cachev3.DeltaResponse, 8),
		subs: map[string]*stream.Subscription{}, cancel: map[string]func(){}, nonces: map[string]string{}}
}

// request sends a request of typ (ack: with the last nonce of the type).
func (d *deltaSim) request(typ string, subscribe, unsubscribe []string, ack bool) {
	d.t.Helper()
	req := &discoverygrpc.DeltaDiscoveryRequest{Node: &corev3.Node{Id: d.node}, TypeUrl: typ,
		ResourceNamesSubscribe: subscribe, ResourceNamesUnsubscribe: unsubscribe}
	if ack {
		req.ResponseNonce = d.nonces[typ]
	}
	sub := d.subs[typ]
	if sub == nil {
		s := stream.NewDeltaSubscription(subscribe, unsubscribe, nil, true)
		sub = &s
		d.subs[typ] = sub
	} else {
		if c := d.cancel[typ]; c != nil {
			c()
		}
		sub.UpdateResourceSubscriptions(subscribe, unsubscribe)
	}
	cancel, err := d.watch(req, *sub, d.ch)
	if err != nil {
		d.t.Fatal(err)
	}
	d.cancel[typ] = cancel
}

// drain processes the responses sent and returns them (resources and
// removals in name order, by type) with the versions each leaves.
func (d *deltaSim) drain() []string {
	d.t.Helper()
	var out []string
	for {
		select {
		case r := <-d.ch:
			m, err := r.GetDeltaDiscoveryResponse()
			if err != nil {
				d.t.Fatal(err)
			}
			typ := r.GetDeltaRequest().GetTypeUrl()
			d.n++
			d.nonces[typ] = fmt.Sprint(d.n)
			d.subs[typ].SetReturnedResources(r.GetNextVersionMap())
			m = sortedDelta(m)
			var res []string
			for _, x := range m.GetResources() {
				var b []byte
				if x.GetResource() != nil {
					b = x.GetResource().GetValue()
				}
				res = append(res, fmt.Sprintf("%s@%s=%x", x.GetName(), x.GetVersion(), b))
			}
			out = append(out, fmt.Sprintf("%s v%s %v removed %v holds %v", shortType(typ), m.GetSystemVersionInfo(),
				res, m.GetRemovedResources(), r.GetNextVersionMap()))
		default:
			sort.Strings(out)
			return out
		}
	}
}

// TestSharedCacheOwnDeltaMatchesSnapshotCache: the delta watches
// sharedCache answers itself (sidecars) send what go-control-plane's
// snapshot cache sends for the same requests and snapshots — the same
// resources and bytes, versions, removals and version maps — through a
// sequence of wildcard and named subscriptions, ACKs, updates of one type
// and of all, a snapshot without clusters and endpoints and back, an
// unsubscription and a new subscription; and the responses carry the
// built's marshaled copies.
func TestSharedCacheOwnDeltaMatchesSnapshotCache(t *testing.T) {
	ctx := context.Background()
	own, ownSC := newSharedTestCache(true)
	ref := cachev3.NewSnapshotCache(true, cachev3.IDHash{}, cacheLogger{logr.Discard()})
	build := func(weight uint32, endpointPort uint32, drop bool) *built {
		r := sharedTestResources(weight)
		r.Endpoints[0].Endpoints[0].LbEndpoints[0].GetEndpoint().GetAddress().GetSocketAddress().PortSpecifier =
			&corev3.SocketAddress_PortValue{PortValue: endpointPort}
		if drop {
			r.Clusters, r.Endpoints = nil, nil
		}
		b, err := buildSnapshot(r, newInternTable(nil))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	var cur *built
	set := func(b *built) {
		t.Helper()
		cur = b
		if err := own.SetSnapshot(ctx, ownSC, "a", b); err != nil {
			t.Fatal(err)
		}
		if err := ref.SetSnapshot(ctx, "a", b.snap); err != nil {
			t.Fatal(err)
		}
	}
	set(build(10, 1, false))
	sims := []*deltaSim{newDeltaSim(t, "a", own.CreateDeltaWatch), newDeltaSim(t, "a", ref.CreateDeltaWatch)}
	const cla = "outbound|80||a.ns.svc.cluster.local"
	step := func(what string, f func(d *deltaSim)) {
		t.Helper()
		for _, d := range sims {
			f(d)
		}
		got, want := sims[0].drain(), sims[1].drain()
		if !slices.Equal(got, want) {
			t.Fatalf("%s: sharedCache sent\n%s\nthe snapshot cache\n%s", what, strings.Join(got, "\n"), strings.Join(want, "\n"))
		}
		t.Logf("%s: %d responses", what, len(got))
	}
	ack := func(types ...string) func(*deltaSim) {
		return func(d *deltaSim) {
			for _, typ := range types {
				d.request(typ, nil, nil, true)
			}
		}
	}
	all := []string{resourcev3.ClusterType, resourcev3.EndpointType, resourcev3.ListenerType, resourcev3.RouteType}
	step("wildcard CDS and LDS", func(d *deltaSim) {
		d.request(resourcev3.ClusterType, nil, nil, false)
		d.request(resourcev3.ListenerType, nil, nil, false)
	})
	step("named EDS and RDS", func(d *deltaSim) {
		d.request(resourcev3.EndpointType, []string{cla, "absent"}, nil, false)
		d.request(resourcev3.RouteType, []string{"80"}, nil, false)
	})
	step("ACKs", ack(all...))
	step("endpoints change", func(*deltaSim) {})
	set(build(10, 2, false))
	step("endpoints changed", func(*deltaSim) {})
	step("ACKs", ack(all...))
	set(build(20, 2, false))
	step("clusters and routes changed", func(*deltaSim) {})
	step("ACKs", ack(all...))
	set(build(20, 2, true))
	step("clusters and endpoints gone", func(*deltaSim) {})
	step("ACKs", ack(all...))
	set(build(20, 3, false))
	step("back", func(*deltaSim) {})
	step("ACKs", ack(all...))
	step("EDS unsubscribed", func(d *deltaSim) { d.request(resourcev3.EndpointType, nil, []string{cla}, true) })
	set(build(20, 4, false))
	step("endpoints changed while unsubscribed", func(*deltaSim) {})
	step("EDS subscribed again", func(d *deltaSim) { d.request(resourcev3.EndpointType, []string{cla}, nil, true) })
	step("ACKs", ack(all...))
	step("CDS wildcard unsubscribed, cluster named", func(d *deltaSim) {
		d.request(resourcev3.ClusterType, []string{cla}, []string{"*"}, true)
	})
	set(build(30, 4, false))
	step("cluster changed", func(*deltaSim) {})
	if sims[0].n < 10 {
		t.Fatalf("only %d responses in the sequence", sims[0].n)
	}
	// A stream that ends leaves nothing behind after the next snapshot
	// (its records were kept through every ACK above: the sequence would
	// have compared in full otherwise, which the mutation of the skip is
	// caught by); a live stream's records stay.
	live := newDeltaSim(t, "a", own.CreateDeltaWatch)
	live.request(resourcev3.ClusterType, nil, nil, false)
	live.drain()
	live.request(resourcev3.ClusterType, nil, nil, true)
	for _, c := range sims[0].cancel {
		c()
	}
	set(build(30, 5, false))
	own.mu.Lock()
	var left []string
	for key := range own.nodes["a"].seen {
		if key.value != live.ch {
			left = append(left, shortType(key.typeURL))
		}
	}
	kept := len(own.nodes["a"].seen) - len(left)
	own.mu.Unlock()
	if len(left) != 0 || kept != 1 {
		t.Fatalf("after the stream ended: records of %v left, %d of the live stream kept (want none, 1)", left, kept)
	}
	// The shared path's responses carry the built's copies.
	sims[0].request(resourcev3.RouteType, nil, []string{"80"}, true)
	sims[0].drain()
	ch := make(chan cachev3.DeltaResponse, 1)
	sub := stream.NewDeltaSubscription([]string{"80"}, nil, nil, false)
	if _, err := own.CreateDeltaWatch(&discoverygrpc.DeltaDiscoveryRequest{Node: &corev3.Node{Id: "a"}, TypeUrl: resourcev3.RouteType,
		ResourceNamesSubscribe: []string{"80"}}, sub, ch); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-ch:
		m, _ := r.GetDeltaDiscoveryResponse()
		if len(m.GetResources()) != 1 || m.GetResources()[0].GetResource() != cur.typeResponse(resourcev3.RouteType).anys[0] {
			t.Fatalf("the route configuration sent is not the built's marshaled copy: %v", m)
		}
	default:
		t.Fatal("no response to a new subscription")
	}
}
