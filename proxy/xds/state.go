package xds

import (
	"bytes"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"google.golang.org/protobuf/types/known/anypb"
)

// entry is one accepted resource: its wire form (for the config dump and
// the persisted state) and its translation.
type entry struct {
	name, version string
	raw           *anypb.Any
	updated       time.Time

	listener  listenerInfo
	services  []service
	vhosts    []vhost // a RouteConfiguration's, for the next version's decode
	cluster   clusterInfo
	endpoints []endpoint
}

// typeState is what the client holds of one resource type.
type typeState struct {
	// version is the version_info of the last accepted SotW response (or
	// the delta system_version_info).
	version string
	entries map[string]*entry
	// received: a response of this type was accepted (or persisted).
	received bool
}

func (t *typeState) clone() *typeState {
	return &typeState{version: t.version, entries: maps.Clone(t.entries), received: t.received}
}

// resources is the client's accepted resources of every type. It is
// replaced, never edited, once published.
type resources map[string]*typeState

func newResources() resources {
	r := resources{}
	for _, t := range typeOrder {
		r[t] = &typeState{entries: map[string]*entry{}}
	}
	return r
}

// with returns a copy of r whose type t is ts.
func (r resources) with(t string, ts *typeState) resources {
	out := maps.Clone(r)
	out[t] = ts
	return out
}

// decode unpacks and translates one resource of type t; the error is in
// the contract's NACK format. prev is the accepted resource of the same
// name (nil: none): what did not change since is not decoded again (see
// reuse and decodeRouteConfig).
func decode(t string, a *anypb.Any, version string, now time.Time, prev *entry) (*entry, error) {
	if a.GetTypeUrl() != t {
		return nil, fmt.Errorf("%s: a resource of type %s in a %s response", shortType(t), a.GetTypeUrl(), shortType(t))
	}
	e := &entry{version: version, raw: a, updated: now}
	if t == RouteType {
		var pv []vhost
		if prev != nil {
			pv = prev.vhosts
		}
		if name, svcs, vhs, err, ok := decodeRouteConfig(a.GetValue(), pv); ok {
			e.name, e.services, e.vhosts = name, svcs, vhs
			if err == nil && e.name == "" {
				err = fmt.Errorf("%s: a resource without a name", shortType(t))
			}
			return e, err
		}
	}
	m, err := a.UnmarshalNew()
	if err != nil {
		return nil, fmt.Errorf("%s: cannot decode: %w", shortType(t), err)
	}
	switch r := m.(type) {
	case *listenerv3.Listener:
		e.name = r.GetName()
		e.listener, err = decodeListener(r)
	case *routev3.RouteConfiguration:
		e.name = r.GetName()
		e.services, err = decodeRoutes(r)
	case *clusterv3.Cluster:
		e.name = r.GetName()
		e.cluster, err = decodeCluster(r)
	case *endpointv3.ClusterLoadAssignment:
		e.name = r.GetClusterName()
		e.endpoints, err = decodeEndpoints(r)
	default:
		return nil, fmt.Errorf("%s: unexpected type %T", shortType(t), m)
	}
	if err == nil && e.name == "" {
		err = fmt.Errorf("%s: a resource without a name", shortType(t))
	}
	return e, err
}

// held returns the accepted resource that x (a resource of type t in a
// response) replaces: the one of its name (delta names it; a SotW
// resource's name is read from its bytes). nil: none, or the bytes cannot
// be read.
func (t *typeState) held(typeURL string, x namedResource) *entry {
	if len(t.entries) == 0 || x.raw.GetTypeUrl() != typeURL {
		return nil
	}
	if x.name != "" {
		return t.entries[x.name]
	}
	n, ok := wireName(x.raw.GetValue())
	if !ok {
		return nil
	}
	return t.entries[string(n)]
}

// reuse returns old for x when x is old's bytes again (an unchanged
// resource in a SotW response, or one a delta server sends again): its
// check and translation stand, with x's version; its last update time
// stays (the resource did not change). nil: x must be decoded.
func reuse(old *entry, x namedResource) *entry {
	if old == nil || !bytes.Equal(old.raw.GetValue(), x.raw.GetValue()) || x.name != "" && x.name != old.name {
		return nil
	}
	e := *old
	e.version = x.version
	return &e
}

// subscriptions are the names to request of the by-name types: the route
// configurations the listeners use and the EDS clusters' service names.
func (r resources) subscriptions() map[string][]string {
	rds := map[string]bool{}
	for _, e := range r[ListenerType].entries {
		for _, n := range e.listener.routeNames {
			rds[n] = true
		}
	}
	eds := map[string]bool{}
	for _, e := range r[ClusterType].entries {
		if e.cluster.eds {
			eds[e.cluster.edsName] = true
		}
	}
	return map[string][]string{RouteType: slices.Sorted(maps.Keys(rds)), EndpointType: slices.Sorted(maps.Keys(eds))}
}

// table is an assembled engine configuration and what it was built from,
// so that the next assembly can keep serving what is still warming.
type table struct {
	cfg engineConfig
	// clusters and routes in cfg, by cluster name and route
	// configuration name.
	clusters map[string]*cluster
	routes   map[string][]service
	// warming lists clusters waiting for endpoints and route
	// configurations waiting to arrive, by name.
	warmingClusters []string
	warmingRoutes   []string
	// seen: clusters and listeners were received at least once.
	seen bool
	// src is what the table was built from.
	src resources
}

// complete reports whether clusters and listeners were received and
// nothing is warming.
func (t *table) complete() bool {
	return t.seen && len(t.warmingClusters) == 0 && len(t.warmingRoutes) == 0
}

// assemble builds the engine configuration from base (the bootstrap's
// static parts) and r. A cluster whose endpoints have not arrived yet is
// warming: the previous table's version of it keeps serving, a new one is
// left out (a route to it answers 503 NC) until they arrive. A route
// configuration a listener uses that has not arrived yet is warming the
// same way. A cluster whose endpoints arrived empty (a service scaled to
// zero) is in the table: a route to it answers 503 UH, as Envoy does.
func assemble(base engineConfig, r resources, prev *table) *table {
	t := &table{cfg: base, clusters: map[string]*cluster{}, routes: map[string][]service{},
		seen: r[ClusterType].received && r[ListenerType].received, src: r}
	t.cfg.Clusters = slices.Clip(base.Clusters)
	t.cfg.Services = slices.Clip(base.Services)
	t.cfg.Ports = slices.Clip(base.Ports)
	static := map[string]bool{}
	for _, c := range base.Clusters {
		static[c.Name] = true
	}
	cds := r[ClusterType].entries
	eds := r[EndpointType].entries
	for _, name := range slices.Sorted(maps.Keys(cds)) {
		info := cds[name].cluster
		if info.skip || static[name] {
			continue
		}
		c := info.cfg
		if info.eds {
			if e := eds[info.edsName]; e != nil {
				c.Endpoints = e.endpoints
			} else if old := prev.cluster(name); old != nil {
				c.Endpoints = old.Endpoints
			} else {
				t.warmingClusters = append(t.warmingClusters, name)
				continue
			}
		}
		t.cfg.Clusters = append(t.cfg.Clusters, c)
	}
	for i := len(base.Clusters); i < len(t.cfg.Clusters); i++ {
		t.clusters[t.cfg.Clusters[i].Name] = &t.cfg.Clusters[i]
	}
	lds := r[ListenerType].entries
	rds := r[RouteType].entries
	httpPorts := map[uint16]bool{}
	tcpPorts := map[uint16]bool{}
	var routeNames []string
	for _, name := range slices.Sorted(maps.Keys(lds)) {
		l := lds[name].listener
		routeNames = append(routeNames, l.routeNames...)
		if l.httpPort != 0 {
			httpPorts[l.httpPort] = true
		}
		if l.tcpPort != 0 {
			tcpPorts[l.tcpPort] = true
		}
		if a := l.authz; !a.empty() {
			t.cfg.Inbound.Authorize, t.cfg.Inbound.AuthorizeConn = a.authorize, a.authorizeConn
		}
		if l.mtls != nil {
			t.cfg.Inbound.MTLS = l.mtls
		}
	}
	sort.Strings(routeNames)
	for _, rn := range slices.Compact(routeNames) {
		svcs, ok := []service(nil), false
		if e := rds[rn]; e != nil {
			svcs, ok = e.services, true
		} else if prev != nil {
			svcs, ok = prev.routes[rn]
		}
		if !ok {
			t.warmingRoutes = append(t.warmingRoutes, rn)
			continue
		}
		t.routes[rn] = svcs
		t.cfg.Services = append(t.cfg.Services, svcs...)
	}
	declared := map[uint16]bool{}
	for _, p := range base.Ports {
		declared[p.Port] = true
	}
	for _, p := range slices.Sorted(maps.Keys(tcpPorts)) {
		if !httpPorts[p] && !declared[p] {
			t.cfg.Ports = append(t.cfg.Ports, portConfig{Port: p, Protocol: "tcp"})
		}
	}
	return t
}

func (t *table) cluster(name string) *cluster {
	if t == nil {
		return nil
	}
	return t.clusters[name]
}

// errNotReady is Ready's answer until a complete configuration serves.
var errNotReady = errors.New("no complete configuration from the control plane yet")
