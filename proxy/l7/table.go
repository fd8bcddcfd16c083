package l7

import (
	"crypto/tls"
	"errors"
	"fmt"
	"net/netip"
	"reflect"
	"slices"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7/route"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
)

// table is one compiled configuration: services with their routes, the
// clusters they send to, port protocols, the frame forwarder's gating and
// the access log policy. A table never changes once built; Update builds a
// new one and swaps it in. A request looks the table up once, when it
// starts, and keeps it to its end.
type table struct {
	cfg          config.L7
	services     []*route.Service
	clusters     map[string]*upstream.Cluster
	portProto    map[uint16]string
	inbound      *upstream.Cluster
	passthrough  *upstream.Cluster
	inboundRoute *route.Route
	// authorizeConn decides inbound connections
	// (config.InboundPolicy.AuthorizeConn); nil allows all.
	authorizeConn func(src, dst netip.AddrPort, cs *tls.ConnectionState) (bool, string)
	// peerAuth is the inbound PeerAuthentication mode per port
	// (config.InboundPolicy.MTLS); nil: no inbound TLS termination.
	peerAuth  *config.InboundMTLS
	passRoute *route.Route
	alog      *accessLogger
	h2        h2gate
	// cfgClusters and byName index cfg's clusters and the compiled
	// services by name, so that the next compile finds what it may keep.
	cfgClusters map[string]*config.Cluster
	byName      map[string]*route.Service
	// shared: cfg came through UpdateShared (its caller does not modify
	// it), so the next UpdateShared may compare with it by identity.
	shared bool
}

// allClusters returns every cluster of t (inbound and passthrough first,
// the others in no particular order).
func (t *table) allClusters() []*upstream.Cluster {
	out := make([]*upstream.Cluster, 0, 2+len(t.clusters))
	out = append(out, t.inbound, t.passthrough)
	for _, c := range t.clusters {
		out = append(out, c)
	}
	return out
}

// Update replaces the engine's route and cluster table with one compiled
// from cfg, atomically:
//
//   - cfg is validated as a whole first (config.L7.ValidateDynamic: as
//     Validate, except that a route may name a cluster cfg does not define;
//     such requests are answered 503 with response flag NC). On any error
//     the current table stays and the error names each bad field and value.
//   - Requests in flight finish on the table they started with; new
//     requests use the new one. No downstream connection is closed.
//   - A cluster that keeps its name and its settings apart from its static
//     endpoints keeps its state: upstream connection pools, balancer and
//     outlier-detection state of the endpoints that remain, health checks,
//     circuit-breaker counts. Its endpoint list is replaced as
//     UpdateEndpoints does. Any other cluster is built anew; the clusters
//     it replaces stop their background work and their idle upstream
//     connections are closed (busy ones finish their requests).
//   - Limits and detection configure the downstream servers and cannot
//     change without a new proxy generation: a change is an error.
//
// Update is safe to call concurrently with traffic and with itself.
func (p *Engine) Update(cfg config.L7) error { return p.update(cfg, false) }

// UpdateShared is Update for a caller that never modifies a configuration
// once it handed it over, and builds each next one sharing what did not
// change (the xDS client: a resource whose bytes did not change keeps its
// translation). A cluster or service of cfg that is the same memory as in
// the running configuration (config.SameCluster, config.SameService) is
// neither validated nor compiled again: the cluster is carried over, the
// service keeps its compiled routes with their retry budgets and series.
// An update that changes one of 1,000 services does the work of one. The
// result is Update's; a caller that edits a configuration it passed must
// use Update.
func (p *Engine) UpdateShared(cfg config.L7) error { return p.update(cfg, true) }

func (p *Engine) update(cfg config.L7, shared bool) error {
	var err error
	if cur := p.tab.Load(); shared && cur.shared {
		// What is the same as in the running configuration was validated
		// with it.
		err = cfg.ValidateDynamicSince(&cur.cfg)
	} else {
		err = cfg.ValidateDynamic()
	}
	if err != nil {
		return err
	}
	var errs []error
	if !reflect.DeepEqual(cfg.Limits, p.lim) {
		errs = append(errs, fmt.Errorf("limits: %+v differs from the running %+v; limits change only with a new proxy generation (hot restart)", cfg.Limits, p.lim))
	}
	if !reflect.DeepEqual(cfg.Detection, p.detection) {
		errs = append(errs, fmt.Errorf("detection.timeout: %v differs from the running %v; detection changes only with a new proxy generation (hot restart)", cfg.Detection.Timeout.D, p.detection.Timeout.D))
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	p.updMu.Lock()
	defer p.updMu.Unlock()
	old := p.tab.Load()
	t, fresh, err := p.compile(cfg, old, shared)
	if err != nil {
		return err
	}
	p.tab.Store(t)
	// Clusters retired earlier: close what went idle since; forget those no
	// request uses any more.
	live := p.retired[:0]
	for _, c := range p.retired {
		c.Retire()
		if c.Active() > 0 {
			live = append(live, c)
		}
	}
	clear(p.retired[len(live):])
	p.retired = live
	// Clusters of the old table that the new one does not carry over (a
	// carried-over cluster is the same value under the same name).
	retire := func(c, now *upstream.Cluster) {
		if c == now {
			return
		}
		c.Retire()
		p.retired = append(p.retired, c)
		if now == nil {
			p.m.dropCluster(c.Name())
		}
	}
	retire(old.inbound, t.inbound)
	retire(old.passthrough, t.passthrough)
	for name, c := range old.clusters {
		retire(c, t.clusters[name])
	}
	p.m.keepRoutes()
	p.startBackground(fresh)
	p.log.Info("l7 table updated", "services", len(t.services), "clusters", len(t.clusters), "new_clusters", len(fresh))
	return nil
}

// UpdateEndpoints replaces the static endpoints of one cluster of the
// current table, keeping the load and outlier state of endpoints that stay
// (the cheap path for endpoint churn, like EDS). The cluster must exist and
// must not be a dns cluster; addresses are ip:port. On error nothing
// changes. A later Update with the cluster's settings unchanged keeps the
// endpoints it names.
func (p *Engine) UpdateEndpoints(cluster string, endpoints []config.Endpoint) error {
	addrs := make([]netip.AddrPort, 0, len(endpoints))
	labels := make(map[netip.AddrPort]map[string]string, len(endpoints))
	var errs []error
	for i, e := range endpoints {
		ap, err := netip.ParseAddrPort(e.Address)
		if err != nil {
			errs = append(errs, fmt.Errorf("clusters[%s].endpoints[%d].address: %q is not ip:port", cluster, i, e.Address))
			continue
		}
		addrs = append(addrs, ap)
		labels[ap] = e.Labels
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	p.updMu.Lock()
	defer p.updMu.Unlock()
	c := p.tab.Load().clusters[cluster]
	switch {
	case c == nil:
		return fmt.Errorf("cluster %q: not defined in the running configuration", cluster)
	case c.Config().DNS != nil:
		return fmt.Errorf("cluster %q: a dns cluster's endpoints come from its name (%s)", cluster, c.Config().DNS.Name)
	}
	c.SetEndpoints(addrs, labels)
	c.SetTLSModes(endpoints)
	return nil
}

// compile builds a table from a validated cfg. Clusters of old (nil for the
// first table) whose settings are unchanged apart from their static
// endpoints are carried over; fresh lists the clusters built anew, whose
// background work the caller starts once the table is in use. When old and
// cfg are both shared (UpdateShared), what is the same as in old
// (config.SameCluster, config.SameService) is not compiled again: such a cluster is carried over without comparing anything, and
// such a service whose routes' clusters are the ones of old keeps its
// compiled routes (matchers, retry budgets, series).
func (p *Engine) compile(cfg config.L7, old *table, shared bool) (t *table, fresh []*upstream.Cluster, err error) {
	p.m.beginRoutes()
	same := shared && old != nil && old.shared // the shortcuts below hold
	t = &table{cfg: cfg, shared: shared, clusters: make(map[string]*upstream.Cluster, len(cfg.Clusters)), portProto: map[uint16]string{},
		cfgClusters: make(map[string]*config.Cluster, len(cfg.Clusters)), byName: make(map[string]*route.Service, len(cfg.Services))}
	t.alog = newAccessLogger(cfg.AccessLog, p.opts.AccessLog)
	for _, pc := range cfg.Ports {
		proto, _ := config.PortProtocol(pc)
		t.portProto[pc.Port] = proto
	}
	for i := range cfg.Clusters {
		c := &t.cfg.Clusters[i]
		t.cfgClusters[c.Name] = c
		if prev := old.cluster(c.Name); prev != nil {
			if oc := old.cfgClusters[c.Name]; same && oc != nil && config.SameCluster(oc, c) {
				t.clusters[c.Name] = prev // what it serves is what old's configuration named
				continue
			}
			if compatible(prev.Config(), c) {
				if c.DNS == nil && !slices.EqualFunc(prev.StaticEndpoints(), c.Endpoints, endpointEqual) {
					prev.SetStatic(c.Endpoints)
				}
				t.clusters[c.Name] = prev
				continue
			}
		}
		// Validate read the TLS files; read again here, a file that changed
		// in between is still an error naming the field.
		cm := p.m.cluster(c.Name)
		ut, errs := upstream.NewTLS(c, fmt.Sprintf("clusters[%d].tls", i), p.log, cm)
		if len(errs) > 0 {
			for _, f := range fresh {
				f.Retire()
			}
			return nil, nil, errors.Join(errs...)
		}
		if ut != nil && c.TLS.InsecureSkipVerify {
			p.log.Warn("upstream TLS certificates are not verified (insecureSkipVerify)", "cluster", c.Name)
		}
		mt := upstream.NewMeshTLS(c, p.identity, p.log, cm)
		nc := upstream.New(*c, upstream.Options{Direction: l4.Outbound, Dial: p.dialUpstream, Metrics: cm, TLS: ut, Mesh: mt, Clock: p.opts.clock})
		t.clusters[c.Name] = nc
		fresh = append(fresh, nc)
	}
	orig := func(name string, pol config.ConnectionPool, dir l4.Direction, prev *upstream.Cluster) *upstream.Cluster {
		if prev != nil && reflect.DeepEqual(prev.Config().Pool, pol) {
			return prev
		}
		return upstream.New(config.Cluster{Name: name, Pool: pol},
			upstream.Options{Direction: dir, Dial: p.dialUpstream, Metrics: p.m.cluster(name), OriginalDst: true})
	}
	var oldIn, oldPass *upstream.Cluster
	if old != nil {
		oldIn, oldPass = old.inbound, old.passthrough
	}
	t.inbound = orig("inbound", cfg.Inbound.Pool, l4.Inbound, oldIn)
	t.passthrough = orig("passthrough", cfg.Passthrough.Pool, l4.Outbound, oldPass)
	t.inboundRoute = route.Local(&config.Route{Name: "inbound", Timeout: cfg.Inbound.Timeout}, t.inbound,
		p.m.route("inbound", "inbound", "inbound"), cfg.Inbound.Authorize)
	t.inboundRoute.Inbound = true
	t.authorizeConn = cfg.Inbound.AuthorizeConn
	t.peerAuth = cfg.Inbound.MTLS
	t.passRoute = route.Local(&config.Route{Name: "passthrough", Timeout: cfg.Passthrough.Timeout}, t.passthrough,
		p.m.route("outbound", "passthrough", "passthrough"), nil)

	outbound := func(key string, c *upstream.Cluster) *route.Metrics { return p.m.route("outbound", key, c.Name()) }
	t.services = make([]*route.Service, 0, len(cfg.Services))
	for i := range cfg.Services {
		s := &t.cfg.Services[i]
		for _, pc := range s.Ports {
			if _, declared := t.portProto[pc.Port]; !declared {
				proto, _ := config.PortProtocol(pc)
				if proto != config.ProtoAuto {
					t.portProto[pc.Port] = proto
				}
			}
		}
		if cs := old.service(s.Name); same && cs != nil && config.SameService(cs.Config, s) && sameClusters(cs, t) {
			for _, r := range cs.Routes {
				p.m.keepRoute(r)
			}
			t.services = append(t.services, cs)
			t.byName[s.Name] = cs
			continue
		}
		// The compiled service keeps its own copy of s, not a pointer into
		// cfg's list (a later table may keep the service and drop the list).
		own := new(config.Service)
		*own = *s
		routes := make([]*route.Route, len(own.Routes))
		for j := range own.Routes {
			routes[j] = route.Compile(own.Name, &own.Routes[j], t.clusters, outbound)
		}
		cs := route.NewService(own, routes)
		t.services = append(t.services, cs)
		t.byName[s.Name] = cs
	}
	t.h2 = newH2Gate(t)
	return t, fresh, nil
}

// service returns the compiled service named name (nil t: none).
func (t *table) service(name string) *route.Service {
	if t == nil {
		return nil
	}
	return t.byName[name]
}

// sameClusters reports whether every cluster the routes of cs (a compiled
// service of an earlier table) send or mirror to is the one t has under
// that name (or t has none, as when cs was compiled).
func sameClusters(cs *route.Service, t *table) bool {
	for _, r := range cs.Routes {
		for _, d := range r.Dests {
			if t.clusters[d.Name] != d.Cluster {
				return false
			}
		}
		if m := r.Config.Mirror; m != nil && t.clusters[m.Cluster] != r.Mirror {
			return false
		}
	}
	return true
}

// cluster returns the cluster named name (nil t: none).
func (t *table) cluster(name string) *upstream.Cluster {
	if t == nil {
		return nil
	}
	return t.clusters[name]
}

// compatible reports whether a cluster built from a can serve b: every
// setting equal apart from the static endpoints (a dns cluster's static
// endpoints feed its resolver, so they must be equal too).
func compatible(a, b *config.Cluster) bool {
	x, y := *a, *b
	if x.DNS == nil && y.DNS == nil {
		x.Endpoints, y.Endpoints = nil, nil
	}
	return reflect.DeepEqual(x, y)
}

func endpointEqual(a, b config.Endpoint) bool {
	return a.Address == b.Address && a.TLSMode == b.TLSMode && reflect.DeepEqual(a.Labels, b.Labels)
}
