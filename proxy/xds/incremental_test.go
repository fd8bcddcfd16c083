package xds

import (
	"reflect"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// TestDecodeRouteConfigPerVirtualHost: a RouteConfiguration is decoded one
// virtual host at a time; with the accepted version's virtual hosts, only
// the changed one is decoded again, and the result (services, NACK
// message) is what decoding the whole configuration gives.
func TestDecodeRouteConfigPerVirtualHost(t *testing.T) {
	rc := bigMesh(3)[resource.RouteType][0].(*routev3.RouteConfiguration)
	whole := func(rc *routev3.RouteConfiguration) ([]service, error) { return decodeRoutes(rc) }
	first, err := decode(RouteType, mustAny(t, rc), "1", time.Now(), nil)
	if err != nil {
		t.Fatal(err)
	}
	if want, _ := whole(rc); !reflect.DeepEqual(first.services, want) || len(first.vhosts) != 3 {
		t.Fatalf("first decode:\n%+v\nwant\n%+v", first.services, want)
	}

	// One weight changes in virtual host 1.
	rc2 := proto.Clone(rc).(*routev3.RouteConfiguration)
	rc2.VirtualHosts[1].Routes[0].GetRoute().GetWeightedClusters().Clusters[0].Weight = wrapperspb.UInt32(7)
	next, err := decode(RouteType, mustAny(t, rc2), "2", time.Now(), first)
	if err != nil {
		t.Fatal(err)
	}
	if want, _ := whole(rc2); !reflect.DeepEqual(next.services, want) {
		t.Fatalf("second decode:\n%+v\nwant\n%+v", next.services, want)
	}
	for i, reused := range []bool{true, false, true} {
		if got := &next.services[i].Routes[0] == &first.services[i].Routes[0]; got != reused {
			t.Errorf("virtual host %d: translation reused %v, want %v", i, got, reused)
		}
	}

	// A refused field in a changed virtual host: the same message as the
	// whole decode's, with the index of the virtual host.
	rc3 := proto.Clone(rc2).(*routev3.RouteConfiguration)
	rc3.VirtualHosts[2].Routes[0].GetMatch().CaseSensitive = wrapperspb.Bool(false)
	rc3.VirtualHosts[2].Domains = append(rc3.VirtualHosts[2].Domains, "a*b")
	_, err = decode(RouteType, mustAny(t, rc3), "3", time.Now(), next)
	_, want := whole(rc3)
	if err == nil || want == nil || err.Error() != want.Error() {
		t.Fatalf("NACK %v\nwant %v", err, want)
	}

	// Bytes that cannot be split are refused as a whole decode refuses them.
	if _, err := decode(RouteType, &anypb.Any{TypeUrl: RouteType, Value: []byte{0x12, 0x05, 0x01}}, "4", time.Now(), next); err == nil {
		t.Fatal("a truncated RouteConfiguration was accepted")
	}
}

func mustAny(t *testing.T, m proto.Message) *anypb.Any {
	t.Helper()
	a, err := anypb.New(m)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// TestSotWReusesUnchangedResources: a SotW response re-sends every
// cluster; those whose bytes did not change keep their translation and
// last update time (only their version follows the response), the changed
// one is decoded again and serves.
func TestSotWReusesUnchangedResources(t *testing.T) {
	c, rs, _ := benchClient(t, 3)
	before := c.res[ClusterType].entries
	clusters := rs[resource.ClusterType]
	changed := proto.Clone(clusters[1].(proto.Message)).(*clusterv3.Cluster)
	changed.LbPolicy = clusterv3.Cluster_LEAST_REQUEST
	next := []types.Resource{clusters[0], changed, clusters[2]}
	r := sotwResponse(ClusterType, "2", next)
	r.received = time.Now() // the first response's is the zero time
	if err := c.handle(r, nopSender{}, nil); err != nil {
		t.Fatal(err)
	}
	if n, ok := c.Status().LastNACK["cds"]; ok {
		t.Fatalf("NACK: %v", n)
	}
	after := c.res[ClusterType].entries
	for i, m := range clusters {
		name := m.(*clusterv3.Cluster).GetName()
		b, a := before[name], after[name]
		if a.version != "2" {
			t.Errorf("%s: version %q, want 2", name, a.version)
		}
		reused := i != 1
		if got := a.updated.Equal(b.updated); got != reused {
			t.Errorf("%s: last update time kept %v, want %v", name, got, reused)
		}
		if got := a.raw == b.raw; got != reused { // a decoded entry holds the response's Any
			t.Errorf("%s: kept the accepted entry %v, want %v", name, got, reused)
		}
	}
	if got := c.tbl.cfg.Clusters[1].LoadBalancer; got != "least_request" {
		t.Fatalf("the changed cluster serves load balancer %q", got)
	}
}
