package server

import (
	"context"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// deltaClient is a raw incremental ADS client subscribed to CDS (wildcard).
type deltaClient struct {
	node   *corev3.Node
	stream discoverygrpc.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
	resp   chan *discoverygrpc.DeltaDiscoveryResponse
	errs   chan error
}

type deltaResp struct {
	raw     *discoverygrpc.DeltaDiscoveryResponse
	names   []string
	removed map[string]bool
}

func (r deltaResp) has(name string) bool {
	for _, n := range r.names {
		if n == name {
			return true
		}
	}
	return false
}

func dialDelta(t testing.TB, addr string, node *corev3.Node) *deltaClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() { cancel(); conn.Close() })
	s, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	d := &deltaClient{node: node, stream: s, resp: make(chan *discoverygrpc.DeltaDiscoveryResponse, 64), errs: make(chan error, 1)}
	if err := s.Send(&discoverygrpc.DeltaDiscoveryRequest{Node: node, TypeUrl: "type.googleapis.com/envoy.config.cluster.v3.Cluster"}); err != nil {
		t.Fatal(err)
	}
	go func() {
		for {
			r, err := s.Recv()
			if err != nil {
				d.errs <- err
				return
			}
			d.resp <- r
		}
	}()
	return d
}

func (d *deltaClient) recv(t testing.TB, typ string) deltaResp {
	t.Helper()
	for {
		select {
		case r := <-d.resp:
			if r.GetTypeUrl() != typ {
				continue
			}
			out := deltaResp{raw: r, removed: map[string]bool{}}
			for _, res := range r.GetResources() {
				out.names = append(out.names, res.GetName())
			}
			for _, n := range r.GetRemovedResources() {
				out.removed[n] = true
			}
			return out
		case err := <-d.errs:
			t.Fatalf("delta stream: %v", err)
		case <-time.After(20 * time.Second):
			t.Fatalf("no delta %s response in 20s", typ)
		}
	}
}

func (d *deltaClient) ack(t testing.TB, r deltaResp) {
	t.Helper()
	if err := d.stream.Send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: r.raw.GetTypeUrl(), ResponseNonce: r.raw.GetNonce()}); err != nil {
		t.Fatal(err)
	}
}
