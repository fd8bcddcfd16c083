package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sort"
	"sync"

	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/meshlet/meshlet/webhook/discovery/translate"
)

// built is one snapshot shared by every proxy with the same translate key,
// with each of its resources marshaled once.
type built struct {
	snap    *cachev3.Snapshot
	version string
	// anys holds the marshaled form of every resource of snap, by the
	// resource (pointer identity): every stream that is sent this
	// snapshot shares these bytes instead of marshaling its own copy.
	anys map[types.Resource]*anypb.Any
}

// interned is one distinct resource (by content) of a push: identical
// resources of different proxy shapes share one object and one marshaled
// copy.
type interned struct {
	res  types.Resource
	any  *anypb.Any
	hash string
}

// internTable maps a resource's content hash to its one copy. A push
// starts a new table and looks up the previous push's, so resources that
// did not change keep their identity and are not held twice.
type internTable struct {
	prev, cur map[string]*interned
}

func newInternTable(prev *internTable) *internTable {
	t := &internTable{cur: map[string]*interned{}}
	if prev != nil {
		t.prev = prev.cur
	}
	return t
}

func (t *internTable) intern(typeURL string, r types.Resource) (*interned, error) {
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(r)
	if err != nil {
		return nil, fmt.Errorf("marshaling %s %q: %w", typeURL, cachev3.GetResourceName(r), err)
	}
	sum := sha256.Sum256(b)
	key := typeURL + "\x00" + string(sum[:])
	if e := t.cur[key]; e != nil {
		return e, nil
	}
	e := t.prev[key]
	if e == nil {
		// The delta version of a resource is go-control-plane's own hash of
		// the same bytes (what ConstructVersionMap would compute).
		e = &interned{res: r, any: &anypb.Any{TypeUrl: typeURL, Value: b}, hash: cachev3.HashResource(b)}
	}
	t.cur[key] = e
	return e, nil
}

var typeOrder = []string{resourcev3.ClusterType, resourcev3.EndpointType, resourcev3.ListenerType, resourcev3.RouteType}

// buildSnapshot makes the snapshot of one proxy shape: every resource is
// marshaled once (interned by content across the push), its delta version
// is the hash of those bytes, the version of a type is the hash of its
// names and their versions, and the snapshot's version the hash of those.
func buildSnapshot(r *translate.Resources, t *internTable) (*built, error) {
	items := r.ByType()
	b := &built{anys: map[types.Resource]*anypb.Any{}}
	versions := map[string]map[string]string{}
	for typ, rs := range items {
		vm := make(map[string]string, len(rs))
		for i, res := range rs {
			e, err := t.intern(typ, res)
			if err != nil {
				return nil, err
			}
			rs[i] = e.res
			b.anys[e.res] = e.any
			vm[cachev3.GetResourceName(e.res)] = e.hash
		}
		versions[typ] = vm
	}
	snap, err := cachev3.NewSnapshot("", items)
	if err != nil {
		return nil, fmt.Errorf("building snapshot: %w", err)
	}
	snap.VersionMap = versions
	b.snap = snap
	all := sha256.New()
	for _, typ := range typeOrder {
		vm := versions[typ]
		if vm == nil {
			vm = map[string]string{}
			versions[typ] = vm
		}
		names := make([]string, 0, len(vm))
		for n := range vm {
			names = append(names, n)
		}
		sort.Strings(names)
		h := sha256.New()
		for _, n := range names {
			fmt.Fprintf(h, "%s=%s\n", n, vm[n])
		}
		v := hex.EncodeToString(h.Sum(nil))[:16]
		snap.Resources[cachev3.GetResponseType(typ)].Version = v
		fmt.Fprintf(all, "%s=%s\n", typ, v)
	}
	b.version = hex.EncodeToString(all.Sum(nil))[:16]
	return b, nil
}

// sharedCache sits between the xDS server and go-control-plane's snapshot
// caches. Those marshal every resource again for every response; with one
// ~1 MB RouteConfiguration per port sent to every proxy, that was most of
// a push's CPU and garbage. sharedCache hands the server responses whose
// resources are the built's pre-marshaled bytes, shared by every stream.
//
// The snapshot caches write a response only while CreateWatch or
// SetSnapshot runs, and sharedCache makes both calls itself, so it needs no
// goroutine: it gives each watch a private one-slot channel and, right
// after either call, moves what arrived there to the server's channel.
// Everything else (versions, names, ADS ordering, the watch life cycle) is
// the snapshot cache's.
type sharedCache struct {
	inner cachev3.Cache

	mu    sync.Mutex
	nodes map[string]*sharedNode // by node id
}

type sharedNode struct {
	b       *built // last set
	watches map[*sharedWatch]struct{}
}

type sharedWatch struct {
	inner chan cachev3.Response
	outer chan cachev3.Response
}

var _ cachev3.Cache = (*sharedCache)(nil)

func newSharedCache(inner cachev3.Cache) *sharedCache {
	return &sharedCache{inner: inner, nodes: map[string]*sharedNode{}}
}

func (c *sharedCache) node(id string) *sharedNode {
	n := c.nodes[id]
	if n == nil {
		n = &sharedNode{watches: map[*sharedWatch]struct{}{}}
		c.nodes[id] = n
	}
	return n
}

// SetSnapshot sets b as node id's snapshot in sc (one of the caches inner
// multiplexes) and passes on the responses that triggered.
func (c *sharedCache) SetSnapshot(ctx context.Context, sc cachev3.SnapshotCache, id string, b *built) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.node(id)
	n.b = b
	err := sc.SetSnapshot(ctx, id, b.snap)
	for w := range n.watches {
		if c.forward(w, n.b) {
			delete(n.watches, w)
		}
	}
	return err
}

// ClearSnapshot forgets node id (its streams are gone).
func (c *sharedCache) ClearSnapshot(sc cachev3.SnapshotCache, id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.nodes, id)
	sc.ClearSnapshot(id)
}

// forward moves a response of w's private channel, if there is one, to the
// server's channel, and reports whether it did (the watch is then done).
func (c *sharedCache) forward(w *sharedWatch, b *built) bool {
	select {
	case r := <-w.inner:
		if raw, ok := r.(*cachev3.RawResponse); ok && b != nil {
			r = &sharedResponse{RawResponse: raw, anys: b.anys}
		}
		// The server's channel has room for one response per type, and a
		// stream has one watch per type: this never waits (the snapshot
		// cache sends the same way, under its lock).
		w.outer <- r
		return true
	default:
		return false
	}
}

// CreateWatch implements cachev3.ConfigWatcher.
func (c *sharedCache) CreateWatch(req *cachev3.Request, sub cachev3.Subscription, value chan cachev3.Response) (func(), error) {
	id := req.GetNode().GetId()
	w := &sharedWatch{inner: make(chan cachev3.Response, 1), outer: value}
	c.mu.Lock()
	defer c.mu.Unlock()
	cancel, err := c.inner.CreateWatch(req, sub, w.inner)
	if err != nil {
		return nil, err
	}
	n := c.node(id)
	if c.forward(w, n.b) {
		return cancel, nil
	}
	n.watches[w] = struct{}{}
	return func() {
		c.mu.Lock()
		if n := c.nodes[id]; n != nil {
			delete(n.watches, w)
		}
		c.mu.Unlock()
		if cancel != nil {
			cancel()
		}
	}, nil
}

// CreateDeltaWatch implements cachev3.ConfigWatcher (delta responses are
// the snapshot cache's own).
func (c *sharedCache) CreateDeltaWatch(req *cachev3.DeltaRequest, sub cachev3.Subscription, value chan cachev3.DeltaResponse) (func(), error) {
	return c.inner.CreateDeltaWatch(req, sub, value)
}

// Fetch implements cachev3.ConfigFetcher.
func (c *sharedCache) Fetch(ctx context.Context, req *cachev3.Request) (cachev3.Response, error) {
	return c.inner.Fetch(ctx, req)
}

// sharedResponse is the snapshot cache's response with the resources'
// shared marshaled bytes.
type sharedResponse struct {
	*cachev3.RawResponse
	anys map[types.Resource]*anypb.Any
}

// GetDiscoveryResponse returns a new response (the server sets its nonce)
// over the shared resources; a resource the built does not hold (never
// expected) falls back to the snapshot cache's own marshaling.
func (r *sharedResponse) GetDiscoveryResponse() (*discoverygrpc.DiscoveryResponse, error) {
	if r.Heartbeat {
		return r.RawResponse.GetDiscoveryResponse()
	}
	raw := r.GetRawResources()
	out := make([]*anypb.Any, 0, len(raw))
	for _, res := range raw {
		a := r.anys[res.Resource]
		if a == nil || res.TTL != nil {
			return r.RawResponse.GetDiscoveryResponse()
		}
		out = append(out, a)
	}
	return &discoverygrpc.DiscoveryResponse{VersionInfo: r.Version, Resources: out, TypeUrl: r.GetRequest().GetTypeUrl()}, nil
}
