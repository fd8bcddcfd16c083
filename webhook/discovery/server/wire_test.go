package server

import (
	"bytes"
	"context"
	"fmt"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
)

// TestWireCodecSharesEncoding: the codec's encoding of a shared SotW
// response is byte for byte the proto encoding of the whole message with
// the stream's nonce; two streams' responses share one encoded body (the
// same backing array) and differ only in the nonce; a response whose
// fields no longer match the shared encoding (another version, an extra
// resource, a canary flag) and any other message are encoded by the proto
// codec, and each decodes to what was sent.
func TestWireCodecSharesEncoding(t *testing.T) {
	ctx := context.Background()
	c, sc := newSharedTestCache(true)
	b, err := buildSnapshot(sharedTestResources(10), newInternTable(nil))
	if err != nil {
		t.Fatal(err)
	}
	codec := newWireCodec()
	encode := func(r *discoverygrpc.DiscoveryResponse) mem.BufferSlice {
		t.Helper()
		out, err := codec.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		want, err := proto.MarshalOptions{Deterministic: true}.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		if got := out.Materialize(); !bytes.Equal(got, want) {
			t.Fatalf("codec encoding of %s (nonce %q) differs from the proto encoding:\n got %x\nwant %x", r.GetTypeUrl(), r.GetNonce(), got, want)
		}
		back := &discoverygrpc.DiscoveryResponse{}
		if err := codec.Unmarshal(out, back); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(back, r) {
			t.Fatalf("decoded %v, sent %v", back, r)
		}
		return out
	}
	var bodies [][]byte
	for i, id := range []string{"a", "b"} {
		if err := c.SetSnapshot(ctx, sc, id, b); err != nil {
			t.Fatal(err)
		}
		for _, typ := range []string{resourcev3.ClusterType, resourcev3.EndpointType, resourcev3.RouteType} {
			ch := make(chan cachev3.Response, 1)
			req := &discoverygrpc.DiscoveryRequest{Node: routeRequest(id, "").Node, TypeUrl: typ}
			if _, err := c.CreateWatch(req, stream.NewSotwSubscription(nil, true), ch); err != nil {
				t.Fatal(err)
			}
			r := recvNow(t, ch)
			r.Nonce = string(rune('1' + i))
			out := encode(r)
			if len(out) != 2 {
				t.Fatalf("%s: the codec did not use the shared encoding (%d buffers)", typ, len(out))
			}
			if typ == resourcev3.RouteType {
				bodies = append(bodies, out[0].ReadOnlyData())
			}
		}
	}
	if len(bodies) != 2 || &bodies[0][0] != &bodies[1][0] {
		t.Fatal("two streams' route responses do not share one encoded body")
	}

	ch := make(chan cachev3.Response, 1)
	if _, err := c.CreateWatch(routeRequest("a", ""), synced(""), ch); err != nil {
		t.Fatal(err)
	}
	base := recvNow(t, ch)
	base.Nonce = "7"
	for name, change := range map[string]func(r *discoverygrpc.DiscoveryResponse){
		"version": func(r *discoverygrpc.DiscoveryResponse) { r.VersionInfo = "other" },
		"canary":  func(r *discoverygrpc.DiscoveryResponse) { r.Canary = true },
		"resources": func(r *discoverygrpc.DiscoveryResponse) {
			r.Resources = append(r.Resources[:len(r.Resources):len(r.Resources)], &anypb.Any{TypeUrl: resourcev3.RouteType})
		},
		"copied resources": func(r *discoverygrpc.DiscoveryResponse) { r.Resources = append([]*anypb.Any(nil), r.Resources...) },
	} {
		r := proto.Clone(base).(*discoverygrpc.DiscoveryResponse)
		r.Resources = base.Resources // Clone copies the slice
		change(r)
		if out := encode(r); len(out) != 1 {
			t.Errorf("%s changed: the codec still used the shared encoding", name)
		}
	}
	if out := encode(&discoverygrpc.DiscoveryResponse{VersionInfo: "1", TypeUrl: resourcev3.RouteType, Nonce: "3"}); len(out) != 1 {
		t.Error("an empty response used a shared encoding")
	}
	if _, err := codec.Marshal(&discoverygrpc.DeltaDiscoveryResponse{Nonce: "1"}); err != nil {
		t.Fatal(err)
	}
}

// TestWireCodecDelta: a delta response with a large resource is encoded
// with that resource's marshaled bytes referenced, not copied, and the
// encoding is byte for byte the proto encoding (with small resources, an
// empty and a missing Any, removals and the nonce); a response with a
// field the codec does not write (a TTL, a control plane) or without a
// large resource is the proto codec's, and every one decodes to what was
// sent.
func TestWireCodecDelta(t *testing.T) {
	codec := newWireCodec()
	big := &anypb.Any{TypeUrl: resourcev3.RouteType, Value: bytes.Repeat([]byte{0x0a, 0x01, 'x'}, sharedValueMin)}
	small := &anypb.Any{TypeUrl: resourcev3.EndpointType, Value: []byte{0x0a, 0x01, 'a'}}
	msg := func() *discoverygrpc.DeltaDiscoveryResponse {
		return &discoverygrpc.DeltaDiscoveryResponse{SystemVersionInfo: "v1", TypeUrl: resourcev3.RouteType, Nonce: "12",
			Resources: []*discoverygrpc.Resource{
				{Name: "80", Version: "h1", Resource: big},
				{Name: "small", Version: "h2", Resource: small},
				{Name: "empty", Resource: &anypb.Any{}},
				{Name: "none", Version: "h3"},
				{Name: "8080", Version: "h4", Resource: big},
			},
			RemovedResources: []string{"gone", ""}}
	}
	check := func(what string, r *discoverygrpc.DeltaDiscoveryResponse, shared bool) {
		t.Helper()
		out, err := codec.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		want, err := proto.MarshalOptions{Deterministic: true}.Marshal(r)
		if err != nil {
			t.Fatal(err)
		}
		if got := out.Materialize(); !bytes.Equal(got, want) {
			t.Fatalf("%s: codec encoding differs from the proto encoding:\n got %x\nwant %x", what, got, want)
		}
		referenced := 0
		for _, b := range out {
			if d := b.ReadOnlyData(); len(d) != 0 && &d[0] == &big.Value[0] {
				referenced++
			}
		}
		if shared && referenced != 2 {
			t.Fatalf("%s: the large resource's bytes were referenced %d times, want 2 (once per resource)", what, referenced)
		}
		if !shared && referenced != 0 {
			t.Fatalf("%s: the proto codec's encoding was expected, the large bytes were referenced", what)
		}
		back := &discoverygrpc.DeltaDiscoveryResponse{}
		if err := codec.Unmarshal(out, back); err != nil {
			t.Fatal(err)
		}
		if !proto.Equal(back, r) {
			t.Fatalf("%s: decoded %v, sent %v", what, back, r)
		}
	}
	check("shared", msg(), true)
	r := msg()
	r.Nonce, r.SystemVersionInfo, r.RemovedResources = "", "", nil
	check("no nonce, version or removals", r, true)
	r = msg()
	r.Resources[1].Ttl = durationpb.New(time.Second)
	check("with a TTL", r, false)
	r = msg()
	r.ControlPlane = &corev3.ControlPlane{Identifier: "x"}
	check("with a control plane", r, false)
	r = msg()
	r.Resources = r.Resources[1:4]
	check("small resources only", r, false)
}

// TestWireCodecDeltaAll: a first delta response holding every resource of
// its type (a proxy's initial clusters) lists the built's one shared list,
// which the codec sends encoded once for every stream: byte for byte the
// proto encoding, the same bytes for two streams, only the nonce apart.
func TestWireCodecDeltaAll(t *testing.T) {
	ctx := context.Background()
	c, sc := newSharedTestCache(true)
	res := sharedTestResources(10)
	res.Clusters = append(res.Clusters, proto.Clone(res.Clusters[0]).(*clusterv3.Cluster))
	res.Clusters[1].Name = "outbound|81||a.ns.svc.cluster.local"
	b, err := buildSnapshot(res, newInternTable(nil))
	if err != nil {
		t.Fatal(err)
	}
	codec := newWireCodec()
	var shared [][]byte
	for i, id := range []string{"a", "b"} {
		if err := c.SetSnapshot(ctx, sc, id, b); err != nil {
			t.Fatal(err)
		}
		ch := make(chan cachev3.DeltaResponse, 1)
		sub := stream.NewDeltaSubscription(nil, nil, nil, true)
		if _, err := c.CreateDeltaWatch(&discoverygrpc.DeltaDiscoveryRequest{Node: &corev3.Node{Id: id}, TypeUrl: resourcev3.ClusterType}, sub, ch); err != nil {
			t.Fatal(err)
		}
		var r cachev3.DeltaResponse
		select {
		case r = <-ch:
		default:
			t.Fatal("no response to a first wildcard request")
		}
		m, err := r.GetDeltaDiscoveryResponse()
		if err != nil {
			t.Fatal(err)
		}
		if len(m.GetResources()) != 2 {
			t.Fatalf("first CDS response has %d clusters, want 2", len(m.GetResources()))
		}
		m.Nonce = fmt.Sprint(i + 1)
		out, err := codec.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		want, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		if got := out.Materialize(); !bytes.Equal(got, want) {
			t.Fatalf("codec encoding differs from the proto encoding:\n got %x\nwant %x", got, want)
		}
		if len(out) != 3 {
			t.Fatalf("the codec did not use the shared encoding (%d buffers)", len(out))
		}
		shared = append(shared, out[1].ReadOnlyData())
	}
	if &shared[0][0] != &shared[1][0] {
		t.Fatal("two streams' first CDS responses do not share one encoding")
	}
}
