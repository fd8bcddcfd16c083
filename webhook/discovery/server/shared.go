package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"sort"
	"strings"
	"sync"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
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
	// types is what a state-of-the-world response of each type carries.
	types map[string]*typeResponse
}

// typeResponse is one type of a built as a SotW response sends it: every
// resource of the type (an ADS response always carries all of them).
type typeResponse struct {
	typeURL string
	version string
	anys    []*anypb.Any // by name
	// names maps each resource to the type's version (what a stream records
	// as returned; each response gets its own copy).
	names map[string]string
	// sorted are the names in order: a request naming exactly these (the
	// usual case, clients sort) needs no set to check it names them all.
	sorted []string
	// resources are the resources by name with their delta versions.
	resources map[string]deltaResource
	// diffs are the diffs to this version from earlier ones, by their
	// version (under sharedCache.mu).
	diffs map[string]*typeDiff
	// all is every resource as a delta response lists it, in name order,
	// and allEncoded their encoding (wire.go); made on first use.
	all        []*discoverygrpc.Resource
	allEncoded typeWire
	// encoded is the response's message encoded once, without a nonce,
	// for every stream (wire.go).
	encoded typeWire
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
	b := &built{anys: map[types.Resource]*anypb.Any{}, types: map[string]*typeResponse{}}
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
		tr := &typeResponse{typeURL: typ, version: v, names: make(map[string]string, len(names)), sorted: names,
			resources: make(map[string]deltaResource, len(names))}
		res := snap.GetResources(typ)
		for _, n := range names {
			a := b.anys[res[n]]
			tr.anys = append(tr.anys, a)
			tr.names[n] = v
			tr.resources[n] = deltaResource{version: vm[n], any: a}
		}
		tr.register()
		b.types[typ] = tr
	}
	b.version = hex.EncodeToString(all.Sum(nil))[:16]
	return b, nil
}

// sharedCache sits between the xDS server and go-control-plane's snapshot
// caches. Those build every response anew: they marshal each resource again
// and allocate per resource and response, for every proxy; with one ~1 MB
// RouteConfiguration per port and a thousand endpoint assignments sent to
// every proxy, that was most of a push's CPU and garbage. sharedCache
// answers with the built's pre-marshaled bytes, shared by every stream:
//
//   - state-of-the-world ADS watches of sidecars (own reports true) it
//     answers itself, from the built's typeResponse, by the snapshot cache's
//     rules (a response when the version differs or a subscribed resource
//     was never returned; in ADS, a response only when the request names
//     every resource of the type, else the watch is dropped until the proxy
//     asks again; responses of one SetSnapshot in type order);
//   - other SotW watches (proxyless gRPC, not ADS-ordered) go to the
//     snapshot cache with a private one-slot channel; the snapshot cache
//     writes a response only while CreateWatch or SetSnapshot runs, and
//     sharedCache makes both calls itself, so right after either it moves
//     what arrived, with the shared bytes, to the server's channel (no
//     goroutine);
//   - delta watches likewise go to the snapshot cache through a private
//     channel (it decides what changed), and the response sent carries the
//     shared bytes; fetches are the snapshot cache's own.
type sharedCache struct {
	inner cachev3.Cache
	own   func(*corev3.Node) bool // sidecars: answered here

	mu    sync.Mutex
	nodes map[string]*sharedNode // by node id
}

type sharedNode struct {
	b       *built                    // last set
	watches map[*sharedWatch]struct{} // forwarded from the snapshot cache
	sotw    map[*sotwWatch]struct{}   // answered here
	deltas  map[*deltaWatch]struct{}  // forwarded from the snapshot cache
	own     map[*ownDeltaWatch]struct{}
	// seen is, by stream and type, what the last delta comparison found
	// the stream to hold (deltaSeen).
	seen map[deltaKey]deltaSeen
}

type sharedWatch struct {
	inner chan cachev3.Response
	outer chan cachev3.Response
}

type sotwWatch struct {
	req   *cachev3.Request
	sub   cachev3.Subscription
	value chan cachev3.Response
}

var _ cachev3.Cache = (*sharedCache)(nil)

func newSharedCache(inner cachev3.Cache, own func(*corev3.Node) bool) *sharedCache {
	return &sharedCache{inner: inner, own: own, nodes: map[string]*sharedNode{}}
}

func (c *sharedCache) node(id string) *sharedNode {
	n := c.nodes[id]
	if n == nil {
		n = &sharedNode{watches: map[*sharedWatch]struct{}{}, sotw: map[*sotwWatch]struct{}{}, deltas: map[*deltaWatch]struct{}{},
			own: map[*ownDeltaWatch]struct{}{}, seen: map[deltaKey]deltaSeen{}}
		c.nodes[id] = n
	}
	return n
}

// SetSnapshot sets b as node id's snapshot in sc (one of the caches inner
// multiplexes; it serves delta and the forwarded watches) and answers the
// watches whose version changed.
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
	for w := range n.deltas {
		if w.forward(n.b) {
			delete(n.deltas, w)
		}
	}
	for key, seen := range n.seen {
		if seen.cancelled {
			delete(n.seen, key)
		}
	}
	owned := make([]*ownDeltaWatch, 0, len(n.own))
	for w := range n.own {
		owned = append(owned, w)
	}
	sort.Slice(owned, func(i, j int) bool {
		return cachev3.GetResponseType(owned[i].req.GetTypeUrl()) < cachev3.GetResponseType(owned[j].req.GetTypeUrl())
	})
	for _, w := range owned {
		if n.respondDelta(w, b) {
			delete(n.own, w)
		}
	}
	ready := make([]*sotwWatch, 0, len(n.sotw))
	for w := range n.sotw {
		if b.typeResponse(w.req.GetTypeUrl()).version != w.req.GetVersionInfo() {
			ready = append(ready, w)
		}
	}
	sort.Slice(ready, func(i, j int) bool {
		return cachev3.GetResponseType(ready[i].req.GetTypeUrl()) < cachev3.GetResponseType(ready[j].req.GetTypeUrl())
	})
	for _, w := range ready {
		delete(n.sotw, w)
		respond(w, b.typeResponse(w.req.GetTypeUrl()))
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

var emptyType = &typeResponse{}

func (b *built) typeResponse(typeURL string) *typeResponse {
	if tr := b.types[typeURL]; tr != nil {
		return tr
	}
	return emptyType
}

// respond sends w the type's response, unless w names resources and not
// all of the type's (ADS: the proxy asks again once it knows them).
func respond(w *sotwWatch, tr *typeResponse) {
	if names := w.req.GetResourceNames(); len(names) != 0 && !slices.Equal(names, tr.sorted) {
		set := make(map[string]struct{}, len(names))
		for _, n := range names {
			set[n] = struct{}{}
		}
		for n := range tr.names {
			if _, ok := set[n]; !ok {
				return
			}
		}
	}
	// The server's channel has room for one response per type, and a stream
	// has one watch per type: this never waits (the snapshot cache sends
	// the same way, under its lock).
	w.value <- &sotwResponse{req: w.req, version: tr.version, anys: tr.anys, returned: maps.Clone(tr.names)}
}

// unknownTo reports whether tr holds a resource sub wants and was never
// sent.
func unknownTo(tr *typeResponse, sub cachev3.Subscription) bool {
	known := sub.ReturnedResources()
	if sub.IsWildcard() {
		for n := range tr.names {
			if _, ok := known[n]; !ok {
				return true
			}
		}
		return false
	}
	for n := range sub.SubscribedResources() {
		if _, ok := known[n]; !ok {
			if _, ok := tr.names[n]; ok {
				return true
			}
		}
	}
	return false
}

// forward moves a response of w's private channel, if there is one, to the
// server's channel, and reports whether it did (the watch is then done).
func (c *sharedCache) forward(w *sharedWatch, b *built) bool {
	select {
	case r := <-w.inner:
		if raw, ok := r.(*cachev3.RawResponse); ok && b != nil {
			r = &sharedResponse{RawResponse: raw, anys: b.anys}
		}
		w.outer <- r // as in respond
		return true
	default:
		return false
	}
}

// CreateWatch implements cachev3.ConfigWatcher.
func (c *sharedCache) CreateWatch(req *cachev3.Request, sub cachev3.Subscription, value chan cachev3.Response) (func(), error) {
	id := req.GetNode().GetId()
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.node(id)
	if c.own(req.GetNode()) {
		w := &sotwWatch{req: req, sub: sub, value: value}
		if n.b != nil {
			tr := n.b.typeResponse(req.GetTypeUrl())
			if req.GetVersionInfo() != tr.version || unknownTo(tr, sub) {
				respond(w, tr)
				return func() {}, nil
			}
		}
		n.sotw[w] = struct{}{}
		return func() {
			c.mu.Lock()
			defer c.mu.Unlock()
			if n := c.nodes[id]; n != nil {
				delete(n.sotw, w)
			}
		}, nil
	}
	w := &sharedWatch{inner: make(chan cachev3.Response, 1), outer: value}
	cancel, err := c.inner.CreateWatch(req, sub, w.inner)
	if err != nil {
		return nil, err
	}
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

// CreateDeltaWatch implements cachev3.ConfigWatcher: the snapshot cache
// decides what a delta response holds, through a private channel as for
// proxyless gRPC, and the response sent carries the shared bytes.
func (c *sharedCache) CreateDeltaWatch(req *cachev3.DeltaRequest, sub cachev3.Subscription, value chan cachev3.DeltaResponse) (func(), error) {
	id := req.GetNode().GetId()
	if c.own(req.GetNode()) {
		return c.createOwnDeltaWatch(id, req, sub, value), nil
	}
	w := &deltaWatch{inner: make(chan cachev3.DeltaResponse, 1), outer: value, sub: sub, typeURL: req.GetTypeUrl()}
	c.mu.Lock()
	defer c.mu.Unlock()
	cancel, err := c.inner.CreateDeltaWatch(req, sub, w.inner)
	if err != nil {
		return nil, err
	}
	n := c.node(id)
	if w.forward(n.b) {
		return cancel, nil
	}
	n.deltas[w] = struct{}{}
	return func() {
		c.mu.Lock()
		if n := c.nodes[id]; n != nil {
			delete(n.deltas, w)
		}
		c.mu.Unlock()
		if cancel != nil {
			cancel()
		}
	}, nil
}

type deltaWatch struct {
	inner   chan cachev3.DeltaResponse
	outer   chan cachev3.DeltaResponse
	sub     cachev3.Subscription // what the snapshot cache answers against
	typeURL string
}

// forward moves a response of w's private channel, if there is one, to the
// server's, over b's shared bytes, and reports whether it did.
func (w *deltaWatch) forward(b *built) bool {
	select {
	case r := <-w.inner:
		if raw, ok := r.(*cachev3.RawDeltaResponse); ok && b != nil {
			if out, ok := sharedDelta(raw, w.sub, b, w.typeURL); ok {
				r = out
			}
		}
		w.outer <- r // one watch per type and stream, as for SotW
		return true
	default:
		return false
	}
}

// sharedDelta is raw (the snapshot cache's delta response for sub, from
// b's snapshot) over b's shared bytes: the same resources, versions (hashes
// of the same bytes) and removals (the snapshot cache's rule: a returned
// resource the snapshot no longer has; for a named subscription, only the
// names still subscribed).
func sharedDelta(raw *cachev3.RawDeltaResponse, sub cachev3.Subscription, b *built, typeURL string) (*deltaResponse, bool) {
	versions := raw.GetNextVersionMap()
	out := &discoverygrpc.DeltaDiscoveryResponse{TypeUrl: typeURL, SystemVersionInfo: raw.SystemVersionInfo}
	for _, res := range raw.GetRawResources() {
		a := b.anys[res.Resource]
		if a == nil || res.TTL != nil {
			return nil, false
		}
		name := cachev3.GetResourceName(res.Resource)
		out.Resources = append(out.Resources, &discoverygrpc.Resource{Name: name, Version: versions[name], Resource: a})
	}
	have := b.typeResponse(typeURL).names
	returned := sub.ReturnedResources()
	if sub.IsWildcard() {
		for name := range returned {
			if _, ok := have[name]; !ok {
				out.RemovedResources = append(out.RemovedResources, name)
			}
		}
	} else {
		for name := range sub.SubscribedResources() {
			if _, ok := have[name]; !ok {
				if _, found := returned[name]; found {
					out.RemovedResources = append(out.RemovedResources, name)
				}
			}
		}
	}
	return &deltaResponse{RawDeltaResponse: raw, out: out}, true
}

// deltaResponse is a delta response over shared bytes.
type deltaResponse struct {
	*cachev3.RawDeltaResponse
	out *discoverygrpc.DeltaDiscoveryResponse
}

// GetDeltaDiscoveryResponse implements cachev3.DeltaResponse. The server
// writes its nonce into the message: it is this response's own (the
// resources in it are shared).
func (r *deltaResponse) GetDeltaDiscoveryResponse() (*discoverygrpc.DeltaDiscoveryResponse, error) {
	return r.out, nil
}

// Fetch implements cachev3.ConfigFetcher.
func (c *sharedCache) Fetch(ctx context.Context, req *cachev3.Request) (cachev3.Response, error) {
	return c.inner.Fetch(ctx, req)
}

// sotwResponse is a SotW response over a built's shared bytes.
type sotwResponse struct {
	req      *cachev3.Request
	version  string
	anys     []*anypb.Any
	returned map[string]string
}

var _ cachev3.Response = (*sotwResponse)(nil)

// GetDiscoveryResponse returns a new message each time (the server writes
// its nonce into it) over the shared resources.
func (r *sotwResponse) GetDiscoveryResponse() (*discoverygrpc.DiscoveryResponse, error) {
	return &discoverygrpc.DiscoveryResponse{VersionInfo: r.version, Resources: r.anys, TypeUrl: r.req.GetTypeUrl()}, nil
}

// GetRequest implements cachev3.Response.
func (r *sotwResponse) GetRequest() *discoverygrpc.DiscoveryRequest { return r.req }

// GetVersion implements cachev3.Response.
func (r *sotwResponse) GetVersion() (string, error) { return r.version, nil }

// GetResponseVersion implements cachev3.Response.
func (r *sotwResponse) GetResponseVersion() string { return r.version }

// GetReturnedResources implements cachev3.Response.
func (r *sotwResponse) GetReturnedResources() map[string]string { return r.returned }

// GetContext implements cachev3.Response.
func (r *sotwResponse) GetContext() context.Context { return context.Background() }

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

// Delta watches of sidecars are answered here too. The snapshot cache
// compared every subscribed resource of a type twice per stream and push
// (once to send the change, once more on the ACK's new watch, finding
// nothing) and built a new version map each time: at 1000 proxies ×
// 1000 Services an endpoint push made two million comparisons and two
// thousand maps of a thousand entries, to send each proxy one
// assignment. Here a watch is compared only when the type's version
// differs from what the stream's last comparison found it to hold
// (deltaSeen), by the snapshot cache's rules (createDeltaResponse: a
// resource is sent when its version differs from the returned one; a
// returned resource the snapshot lacks is removed, for a named
// subscription only while subscribed; the first wildcard request is
// always answered), and the response carries the built's shared bytes.

// deltaResource is one resource of a typeResponse as delta sends it.
type deltaResource struct {
	version string
	any     *anypb.Any
}

// ownDeltaWatch is a delta watch of a sidecar.
type ownDeltaWatch struct {
	req   *cachev3.DeltaRequest
	sub   cachev3.Subscription
	value chan cachev3.DeltaResponse
}

// deltaKey is one stream's (its response channel's) type.
type deltaKey struct {
	value   chan cachev3.DeltaResponse
	typeURL string
}

// deltaSeen is what the last comparison of a stream's type found: its
// returned-resources map (the subscription's, by identity) held
// everything it subscribes to at tr's version. While the request changes
// no subscription and the map is the same, a type at that version has
// nothing to send, and at another version only what changed since tr (a
// diff made once per pair of versions, not per stream) — when the map
// holds exactly tr's versions of the subscribed names (exact: the map is
// one this cache made, or a comparison proved it). The delta server
// replaces the map with each response's and changes it in place only on
// an unsubscription, which the request carries.
type deltaSeen struct {
	returned  map[string]string
	tr        *typeResponse
	exact     bool
	cancelled bool // the stream's last watch of the type was cancelled
}

// typeDiff is what changed from one version of a type to another: the
// resources new or changed, and those gone.
type typeDiff struct{ changed, removed []string }

// diffFrom returns the diff from prev to tr, made once per prev version
// (under sharedCache.mu).
func (tr *typeResponse) diffFrom(prev *typeResponse) *typeDiff {
	if d := tr.diffs[prev.version]; d != nil {
		return d
	}
	d := &typeDiff{}
	for _, name := range tr.sorted {
		if p, ok := prev.resources[name]; !ok || p.version != tr.resources[name].version {
			d.changed = append(d.changed, name)
		}
	}
	for _, name := range prev.sorted {
		if _, ok := tr.resources[name]; !ok {
			d.removed = append(d.removed, name)
		}
	}
	if tr == emptyType { // shared by every cache: not memoized
		return d
	}
	if tr.diffs == nil {
		tr.diffs = map[string]*typeDiff{}
	}
	tr.diffs[prev.version] = d
	return d
}

func sameMap(a, b map[string]string) bool {
	return reflect.ValueOf(a).UnsafePointer() == reflect.ValueOf(b).UnsafePointer()
}

func (c *sharedCache) createOwnDeltaWatch(id string, req *cachev3.DeltaRequest, sub cachev3.Subscription, value chan cachev3.DeltaResponse) func() {
	c.mu.Lock()
	defer c.mu.Unlock()
	n := c.node(id)
	w := &ownDeltaWatch{req: req, sub: sub, value: value}
	key := deltaKey{value, req.GetTypeUrl()}
	if seen, ok := n.seen[key]; ok {
		seen.cancelled = false
		n.seen[key] = seen
	}
	// The delta server cancels a stream's watch of a type before it opens
	// the next (a request) and when the stream ends; a record still
	// cancelled at a SetSnapshot is dropped (a stream gone, or one between
	// the two calls: its next watch is then compared in full).
	cancel := func() {
		c.mu.Lock()
		defer c.mu.Unlock()
		n := c.nodes[id]
		if n == nil {
			return
		}
		delete(n.own, w)
		if seen, ok := n.seen[key]; ok {
			seen.cancelled = true
			n.seen[key] = seen
		}
	}
	if n.b != nil && n.respondDelta(w, n.b) {
		return cancel
	}
	n.own[w] = struct{}{}
	return cancel
}

// respondDelta sends w what b changes for it, if anything, and reports
// whether it did (the watch is then done).
func (n *sharedNode) respondDelta(w *ownDeltaWatch, b *built) bool {
	typ := w.req.GetTypeUrl()
	tr := b.typeResponse(typ)
	key := deltaKey{w.value, typ}
	returned := w.sub.ReturnedResources()
	first := w.sub.IsWildcard() && w.req.GetResponseNonce() == ""
	changes := len(w.req.GetResourceNamesSubscribe()) != 0 || len(w.req.GetResourceNamesUnsubscribe()) != 0 ||
		len(w.req.GetInitialResourceVersions()) != 0
	var out *discoverygrpc.DeltaDiscoveryResponse
	var next map[string]string
	exact := false
	if seen, ok := n.seen[key]; ok && !first && !changes && sameMap(seen.returned, returned) {
		switch {
		case seen.tr.version == tr.version:
			return false
		case seen.exact:
			out, next = deltaSince(tr.diffFrom(seen.tr), tr, w.sub)
			exact = true
		default:
			out, next, exact = deltaDiff(tr, w.sub)
		}
	} else {
		out, next, exact = deltaDiff(tr, w.sub)
	}
	if out == nil && !first {
		n.seen[key] = deltaSeen{returned: returned, tr: tr, exact: exact}
		return false
	}
	if out == nil {
		out = &discoverygrpc.DeltaDiscoveryResponse{}
	}
	if next == nil {
		next = maps.Clone(returned)
	}
	if len(out.Resources) == len(tr.sorted) && len(tr.sorted) != 0 {
		// Every resource of the type (a first response): the shared list,
		// which wireCodec sends encoded once (the same set: out holds
		// distinct resources of tr at tr's versions).
		out.Resources = tr.allDelta()
	}
	out.TypeUrl, out.SystemVersionInfo = typ, tr.version
	n.seen[key] = deltaSeen{returned: next, tr: tr, exact: true}
	// One watch per type and stream, and the server's channel has room
	// for two responses per type: this never waits.
	w.value <- &ownDeltaResponse{req: w.req, out: out, next: next}
	return true
}

// deltaSince is deltaDiff for a subscription whose returned versions are
// exactly those of the version d starts from: only d's resources are
// looked at, and the versions it then holds are the returned ones with
// d applied.
func deltaSince(d *typeDiff, tr *typeResponse, sub cachev3.Subscription) (*discoverygrpc.DeltaDiscoveryResponse, map[string]string) {
	returned := sub.ReturnedResources()
	wildcard, subscribed := sub.IsWildcard(), sub.SubscribedResources()
	wants := func(name string) bool {
		if wildcard {
			return true
		}
		_, ok := subscribed[name]
		return ok
	}
	var out *discoverygrpc.DeltaDiscoveryResponse
	for _, name := range d.changed {
		if wants(name) {
			if out == nil {
				out = &discoverygrpc.DeltaDiscoveryResponse{}
			}
			r := tr.resources[name]
			out.Resources = append(out.Resources, &discoverygrpc.Resource{Name: name, Version: r.version, Resource: r.any})
		}
	}
	for _, name := range d.removed {
		if _, held := returned[name]; held && wants(name) {
			if out == nil {
				out = &discoverygrpc.DeltaDiscoveryResponse{}
			}
			out.RemovedResources = append(out.RemovedResources, name)
		}
	}
	if out == nil {
		return nil, nil
	}
	next := maps.Clone(returned)
	for _, r := range out.Resources {
		next[r.Name] = r.Version
	}
	for _, name := range out.RemovedResources {
		delete(next, name)
	}
	return out, next
}

// deltaDiff compares sub with tr as the snapshot cache's
// createDeltaResponse does and returns the response's resources and
// removals and the versions the stream then holds, or nil, nil when
// nothing changed, and whether the returned versions are then exactly
// tr's of the subscribed names (always so after a response).
func deltaDiff(tr *typeResponse, sub cachev3.Subscription) (*discoverygrpc.DeltaDiscoveryResponse, map[string]string, bool) {
	returned := sub.ReturnedResources()
	var out *discoverygrpc.DeltaDiscoveryResponse
	add := func(name string, r deltaResource) {
		if out == nil {
			out = &discoverygrpc.DeltaDiscoveryResponse{}
		}
		out.Resources = append(out.Resources, &discoverygrpc.Resource{Name: name, Version: r.version, Resource: r.any})
	}
	remove := func(name string) {
		if out == nil {
			out = &discoverygrpc.DeltaDiscoveryResponse{}
		}
		out.RemovedResources = append(out.RemovedResources, name)
	}
	if sub.IsWildcard() {
		for _, name := range tr.sorted {
			r := tr.resources[name]
			if prev, ok := returned[name]; !ok || prev != r.version {
				add(name, r)
			}
		}
		for name := range returned {
			if _, ok := tr.resources[name]; !ok {
				remove(name)
			}
		}
		if out == nil {
			return nil, nil, true // returned is tr's, name for name
		}
		next := make(map[string]string, len(tr.resources))
		for name, r := range tr.resources {
			next[name] = r.version
		}
		sort.Strings(out.RemovedResources)
		return out, next, true
	}
	subscribed := sub.SubscribedResources()
	held := 0
	for name := range subscribed {
		prev, found := returned[name]
		if r, ok := tr.resources[name]; ok {
			if prev != r.version {
				add(name, r)
			} else {
				held++
			}
		} else if found {
			remove(name)
		}
	}
	if out == nil {
		// Exact unless returned also holds names no longer subscribed.
		return nil, nil, held == len(returned)
	}
	next := make(map[string]string, len(subscribed))
	for name := range subscribed {
		if r, ok := tr.resources[name]; ok {
			next[name] = r.version
		}
	}
	slices.SortFunc(out.Resources, func(a, b *discoverygrpc.Resource) int { return strings.Compare(a.Name, b.Name) })
	sort.Strings(out.RemovedResources)
	return out, next, true
}

// ownDeltaResponse is a delta response of a sidecar's watch.
type ownDeltaResponse struct {
	req  *cachev3.DeltaRequest
	out  *discoverygrpc.DeltaDiscoveryResponse
	next map[string]string
}

var _ cachev3.DeltaResponse = (*ownDeltaResponse)(nil)

// GetDeltaDiscoveryResponse implements cachev3.DeltaResponse (the server
// writes its nonce into the message, this response's own).
func (r *ownDeltaResponse) GetDeltaDiscoveryResponse() (*discoverygrpc.DeltaDiscoveryResponse, error) {
	return r.out, nil
}

// GetDeltaRequest implements cachev3.DeltaResponse.
func (r *ownDeltaResponse) GetDeltaRequest() *discoverygrpc.DeltaDiscoveryRequest { return r.req }

// GetSystemVersion implements cachev3.DeltaResponse.
func (r *ownDeltaResponse) GetSystemVersion() (string, error) { return r.out.SystemVersionInfo, nil }

// GetResponseVersion implements cachev3.DeltaResponse.
func (r *ownDeltaResponse) GetResponseVersion() string { return r.out.SystemVersionInfo }

// GetNextVersionMap implements cachev3.DeltaResponse.
func (r *ownDeltaResponse) GetNextVersionMap() map[string]string { return r.next }

// GetReturnedResources implements cachev3.DeltaResponse.
func (r *ownDeltaResponse) GetReturnedResources() map[string]string { return r.next }

// GetContext implements cachev3.DeltaResponse.
func (r *ownDeltaResponse) GetContext() context.Context { return context.Background() }
