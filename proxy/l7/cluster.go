package l7

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
)

// endpoint is one upstream address and its load/health state, shared by all
// subsets that select it.
type endpoint struct {
	addr   string // ip:port, the transport's pool key
	labels map[string]string

	inflight atomic.Int64
	picked   atomic.Uint64 // requests sent (for tests and debugging)

	// Peak-EWMA state (linkerd2-proxy's balancer): cost = rtt × (inflight+1).
	ewmaMu    sync.Mutex
	ewmaNanos float64
	ewmaStamp time.Time

	// Outlier detection (passive) and active health checking.
	outMu        sync.Mutex
	consec5xx    int
	consecGw     int
	consecConn   int
	ejections    int
	ejectedUntil time.Time
	ejected      atomic.Bool
	unhealthy    atomic.Bool
	hcFails      int
	hcOKs        int
}

func (e *endpoint) available(now time.Time) bool {
	if e.unhealthy.Load() {
		return false
	}
	if e.ejected.Load() {
		e.outMu.Lock()
		defer e.outMu.Unlock()
		if now.Before(e.ejectedUntil) {
			return false
		}
		// The ejection interval is over: return to the pool (the ejection
		// count stays, so the next ejection lasts longer).
		e.ejected.Store(false)
		e.consec5xx, e.consecGw, e.consecConn = 0, 0, 0
	}
	return true
}

const ewmaDecay = 10 * time.Second // linkerd2-proxy's default

func (e *endpoint) observeRTT(rtt time.Duration, now time.Time) {
	e.ewmaMu.Lock()
	defer e.ewmaMu.Unlock()
	v := float64(rtt)
	if v > e.ewmaNanos || e.ewmaStamp.IsZero() {
		e.ewmaNanos = v // peak: react to a slowdown at once
	} else {
		w := math.Exp(-float64(now.Sub(e.ewmaStamp)) / float64(ewmaDecay))
		e.ewmaNanos = e.ewmaNanos*w + v*(1-w)
	}
	e.ewmaStamp = now
}

func (e *endpoint) ewmaCost() float64 {
	e.ewmaMu.Lock()
	rtt := e.ewmaNanos
	e.ewmaMu.Unlock()
	if rtt == 0 {
		rtt = float64(time.Millisecond) // unmeasured: optimistic default
	}
	return rtt * float64(e.inflight.Load()+1)
}

// pool is the endpoint list of a cluster or one of its subsets.
type pool struct {
	eps atomic.Pointer[[]*endpoint]
	rr  atomic.Uint64
}

func (p *pool) list() []*endpoint {
	if l := p.eps.Load(); l != nil {
		return *l
	}
	return nil
}

// pick chooses an endpoint with the balancer lb, skipping ejected and
// unhealthy endpoints unless none is left (then all are candidates — Envoy's
// panic mode — so a fully failing cluster still gets traffic and recovers).
// skip is avoided if possible (the previous attempt's endpoint on retry).
func (p *pool) pick(lb string, skip *endpoint, now time.Time) *endpoint {
	eps := p.list()
	switch len(eps) {
	case 0:
		return nil
	case 1:
		return eps[0]
	}
	var buf [32]*endpoint
	cand := buf[:0]
	for _, e := range eps {
		if e != skip && e.available(now) {
			cand = append(cand, e)
		}
	}
	if len(cand) == 0 {
		for _, e := range eps {
			if e.available(now) {
				cand = append(cand, e)
			}
		}
	}
	if len(cand) == 0 {
		cand = eps
	}
	if len(cand) == 1 {
		return cand[0]
	}
	switch lb {
	case config.LBLeastRequest, config.LBPeakEWMA:
		// Power of two choices.
		i := rand.IntN(len(cand))
		j := rand.IntN(len(cand) - 1)
		if j >= i {
			j++
		}
		a, b := cand[i], cand[j]
		if lb == config.LBLeastRequest {
			if b.inflight.Load() < a.inflight.Load() {
				return b
			}
			return a
		}
		if b.ewmaCost() < a.ewmaCost() {
			return b
		}
		return a
	default:
		return cand[int(p.rr.Add(1)%uint64(len(cand)))]
	}
}

// cluster is the runtime form of a configured cluster (or of the
// original-destination passthrough).
type cluster struct {
	name     string
	cfg      config.Cluster
	lb       string
	all      pool
	subsets  map[string]*pool
	outlier  *config.OutlierDetection
	h1, h2   *http.Transport
	direct   *h1Transport // HTTP/1.1 fast path (small bodies, no upgrade)
	tls      *upstreamTLS // nil: plain text
	proto    string       // http1 | http2 | auto
	active   atomic.Int64
	pending  atomic.Int64
	maxReq   int64
	maxPend  int64
	maxConns int
	m        *clusterMetrics

	epMu   sync.Mutex
	byKey  map[string]*endpoint
	static []config.Endpoint // the static endpoints in use (config or UpdateEndpoints)

	stop  context.CancelFunc // ends the cluster's background work (nil: none started)
	clock func() time.Time   // outlier ejection time (nil: time.Now; tests move it)
}

// now is the time outlier ejections are measured in.
func (c *cluster) now() time.Time {
	if c.clock != nil {
		return c.clock()
	}
	return time.Now()
}

// staticEndpoints returns the static endpoints the cluster serves.
func (c *cluster) staticEndpoints() []config.Endpoint {
	c.epMu.Lock()
	defer c.epMu.Unlock()
	return c.static
}

// setStatic replaces the static endpoints (validated addresses).
func (c *cluster) setStatic(eps []config.Endpoint) {
	addrs := make([]netip.AddrPort, 0, len(eps))
	labels := make(map[netip.AddrPort]map[string]string, len(eps))
	for _, e := range eps {
		ap := netip.MustParseAddrPort(e.Address) // validated
		addrs = append(addrs, ap)
		labels[ap] = e.Labels
	}
	c.setEndpoints(addrs, labels)
	c.epMu.Lock()
	c.static = slices.Clone(eps)
	c.epMu.Unlock()
}

// retire stops the background work of a cluster an Update replaced and
// closes its idle upstream connections; requests still using it finish.
func (c *cluster) retire() {
	if c.stop != nil {
		c.stop()
	}
	c.h1.CloseIdleConnections()
	c.h2.CloseIdleConnections()
	c.direct.close()
}

// Errors the router reports (mapped to status codes and access-log flags).
var (
	errOverflow      = errors.New("upstream overflow: circuit breaker open (max requests)")
	errPendingFull   = errors.New("upstream overflow: circuit breaker open (max pending requests)")
	errNoEndpoint    = errors.New("no healthy upstream")
	errPerTryTimeout = errors.New("upstream per-try timeout")
	errRouteTimeout  = errors.New("upstream request timeout")
)

// connectError marks a failure to establish the upstream connection.
type connectError struct{ err error }

func (e *connectError) Error() string { return "upstream connect failure: " + e.err.Error() }
func (e *connectError) Unwrap() error { return e.err }

// DialFunc dials an upstream. dir tells inbound (to the local app, which the
// sidecar dials from 127.0.0.6) from outbound.
type DialFunc func(ctx context.Context, dir l4.Direction, network, addr string) (net.Conn, error)

func newCluster(cfg config.Cluster, dir l4.Direction, dial DialFunc, m *clusterMetrics, ut *upstreamTLS) *cluster {
	c := &cluster{
		name:    cfg.Name,
		cfg:     cfg,
		lb:      cfg.LoadBalancer,
		outlier: cfg.Outlier,
		proto:   cfg.Protocol,
		maxReq:  int64(cfg.Pool.MaxRequests),
		maxPend: int64(cfg.Pool.MaxPendingRequests),
		m:       m,
		tls:     ut,
		byKey:   map[string]*endpoint{},
	}
	if c.lb == "" {
		c.lb = config.LBRoundRobin
	}
	if c.proto == "" {
		c.proto = "auto"
	}
	c.maxConns = cfg.Pool.MaxConnections
	c.h1, c.h2, c.direct = newTransports(cfg.Pool, dir, dial, m, cfg.Endpoints, ut)
	c.setStatic(cfg.Endpoints)
	return c
}

func newTransports(pc config.ConnectionPool, dir l4.Direction, dial DialFunc, m *clusterMetrics, eps []config.Endpoint, ut *upstreamTLS) (h1, h2 *http.Transport, direct *h1Transport) {
	idle := pc.MaxIdlePerEndpoint
	if idle == 0 {
		idle = 64
	}
	idleTimeout := pc.IdleTimeout.D
	if idleTimeout == 0 {
		idleTimeout = 90 * time.Second
	}
	connectTimeout := pc.ConnectTimeout.D
	if connectTimeout == 0 {
		connectTimeout = 10 * time.Second
	}
	// Envoy's maxConnections is per cluster; net/http limits per host, so
	// the budget is split across the static endpoints.
	perHost := 0
	if pc.MaxConnections > 0 {
		n := max(len(eps), 1)
		perHost = max((pc.MaxConnections+n-1)/n, 1)
	}
	dialFn := func(ctx context.Context, network, addr string) (net.Conn, error) {
		ctx, cancel := context.WithTimeout(ctx, connectTimeout)
		defer cancel()
		c, err := dial(ctx, dir, network, addr)
		if err != nil {
			if m != nil {
				m.connectFailures.Inc()
			}
			return nil, &connectError{err}
		}
		return c, nil
	}
	mk := func(p http.Protocols) *http.Transport {
		return &http.Transport{
			DialContext:         dialFn,
			MaxIdleConns:        0,
			MaxIdleConnsPerHost: idle,
			MaxConnsPerHost:     perHost,
			IdleConnTimeout:     idleTimeout,
			DisableCompression:  true,
			Protocols:           &p,
			// Large upstream response headers are bounded like downstream ones.
			MaxResponseHeaderBytes: 1 << 20,
		}
	}
	var p1, p2 http.Protocols
	p1.SetHTTP1(true)
	p2.SetUnencryptedHTTP2(true)
	direct = &h1Transport{dial: dialFn, maxIdle: idle, idleTimeout: idleTimeout, perHost: perHost}
	// HTTP/2: net/http's one connection per endpoint. Spreading streams
	// over 4 connections was measured slower (BenchmarkGRPCParallel
	// l7-2hops: 450µs → 700µs per call with 16 callers on 2 cores).
	h1, h2 = mk(p1), mk(p2)
	if ut != nil {
		ut.setup(h1, h2, direct, dialFn, connectTimeout)
	}
	return h1, h2, direct
}

// scheme is the URL scheme of requests to c's endpoints: https makes
// net/http's transports dial with TLS.
func (c *cluster) scheme() string {
	if c.tls != nil {
		return "https"
	}
	return "http"
}

// setEndpoints replaces the endpoint set, keeping the state of endpoints that
// stay, and recomputes the subsets.
func (c *cluster) setEndpoints(addrs []netip.AddrPort, labels map[netip.AddrPort]map[string]string) {
	c.epMu.Lock()
	defer c.epMu.Unlock()
	next := map[string]*endpoint{}
	list := make([]*endpoint, 0, len(addrs))
	for _, ap := range addrs {
		key := ap.String()
		if next[key] != nil {
			continue
		}
		e := c.byKey[key]
		if e == nil {
			e = &endpoint{addr: key}
		}
		e.labels = labels[ap]
		next[key] = e
		list = append(list, e)
	}
	c.byKey = next
	c.all.eps.Store(&list)
	if c.subsets == nil {
		c.subsets = map[string]*pool{}
		for _, s := range c.cfg.Subsets {
			c.subsets[s.Name] = &pool{}
		}
	}
	for _, s := range c.cfg.Subsets {
		var sl []*endpoint
		for _, e := range list {
			if selects(s.Labels, e.labels) {
				sl = append(sl, e)
			}
		}
		c.subsets[s.Name].eps.Store(&sl)
	}
	if c.m != nil {
		c.m.endpoints.Set(float64(len(list)))
	}
}

func selects(sel, labels map[string]string) bool {
	for k, v := range sel {
		if labels[k] != v {
			return false
		}
	}
	return true
}

func (c *cluster) pool(subset string) *pool {
	if subset == "" {
		return &c.all
	}
	return c.subsets[subset]
}

func (c *cluster) transport(r *http.Request) http.RoundTripper {
	switch {
	case c.proto == "http2", c.proto == "auto" && (r.ProtoMajor == 2 || isGRPC(r)):
		return c.h2
	case c.direct.canServe(r):
		return c.direct
	}
	return c.h1
}

// outcome of one upstream attempt, for outlier detection.
type outcome int

const (
	outcomeOK outcome = iota
	outcome5xx
	outcomeGateway // 502, 503, 504
	outcomeConnect // connect failure (also a gateway error)
	outcomeLocal   // not the endpoint's fault (client cancel, our timeout)
)

// record feeds passive outlier detection.
func (c *cluster) record(e *endpoint, o outcome) {
	od := c.outlier
	if od == nil || o == outcomeLocal {
		return
	}
	e.outMu.Lock()
	switch o {
	case outcomeOK:
		e.consec5xx, e.consecGw, e.consecConn = 0, 0, 0
		e.outMu.Unlock()
		return
	case outcome5xx:
		e.consec5xx++
		e.consecGw = 0
	case outcomeGateway:
		e.consec5xx++
		e.consecGw++
	case outcomeConnect:
		e.consec5xx++
		e.consecGw++
		e.consecConn++
	}
	trip := od.Consecutive5xx > 0 && e.consec5xx >= od.Consecutive5xx ||
		od.ConsecutiveGatewayErrors > 0 && e.consecGw >= od.ConsecutiveGatewayErrors ||
		od.ConsecutiveConnectFailure > 0 && e.consecConn >= od.ConsecutiveConnectFailure
	if !trip || e.ejected.Load() {
		e.outMu.Unlock()
		return
	}
	e.outMu.Unlock()
	// Respect maxEjectionPercent (default 10% like Envoy, but at least one).
	maxPct := od.MaxEjectionPercent
	if maxPct == 0 {
		maxPct = 10
	}
	eps := c.all.list()
	ejected := 0
	for _, x := range eps {
		if x.ejected.Load() {
			ejected++
		}
	}
	// Like Envoy, at least one endpoint may always be ejected.
	if ejected+1 > max(len(eps)*maxPct/100, 1) {
		return
	}
	base := od.BaseEjectionTime.D
	if base == 0 {
		base = 30 * time.Second
	}
	maxT := od.MaxEjectionTime.D
	if maxT == 0 {
		maxT = 300 * time.Second
	}
	e.outMu.Lock()
	e.ejections++
	d := min(base*time.Duration(e.ejections), max(maxT, base))
	e.ejectedUntil = c.now().Add(d)
	e.ejected.Store(true)
	e.consec5xx, e.consecGw, e.consecConn = 0, 0, 0
	e.outMu.Unlock()
	if c.m != nil {
		c.m.ejections.Inc()
	}
}

// healthCheck probes every endpoint of c until ctx ends.
func (c *cluster) healthCheck(ctx context.Context, dial DialFunc) {
	hc := c.cfg.HealthCheck
	interval := hc.Interval.D
	if interval == 0 {
		interval = 10 * time.Second
	}
	timeout := hc.Timeout.D
	if timeout == 0 {
		timeout = time.Second
	}
	unhealthyAfter := max(hc.UnhealthyThreshold, 1)
	if hc.UnhealthyThreshold == 0 {
		unhealthyAfter = 2
	}
	healthyAfter := max(hc.HealthyThreshold, 1)
	path := hc.Path
	if path == "" {
		path = "/healthz"
	}
	client := &http.Client{Transport: c.h1, Timeout: timeout,
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	probe := func(e *endpoint) bool {
		if hc.Type == "grpc" {
			return grpcHealthCheck(ctx, c.h2, c.scheme()+"://"+e.addr, hc.ServiceName, timeout) == nil
		}
		if hc.Type == "tcp" {
			pctx, cancel := context.WithTimeout(ctx, timeout)
			defer cancel()
			conn, err := dial(pctx, l4.Outbound, "tcp", e.addr)
			if err != nil {
				return false
			}
			conn.Close()
			return true
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.scheme()+"://"+e.addr+path, nil)
		if err != nil {
			return false
		}
		req.Header.Set("User-Agent", "meshlet-health-check")
		resp, err := client.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode >= 200 && resp.StatusCode < 300
	}
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		var wg sync.WaitGroup
		for _, e := range c.all.list() {
			wg.Add(1)
			go func() {
				defer wg.Done()
				ok := probe(e)
				e.outMu.Lock()
				defer e.outMu.Unlock()
				if ok {
					e.hcFails = 0
					e.hcOKs++
					if e.unhealthy.Load() && e.hcOKs >= healthyAfter {
						e.unhealthy.Store(false)
					}
				} else {
					e.hcOKs = 0
					e.hcFails++
					if !e.unhealthy.Load() && e.hcFails >= unhealthyAfter {
						e.unhealthy.Store(true)
						if c.m != nil {
							c.m.hcFailures.Inc()
						}
					}
				}
			}()
		}
		wg.Wait()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// Resolver resolves host names; *net.Resolver implements it. Tests pass
// their own so nothing outside the machine is ever asked.
type Resolver interface {
	LookupNetIP(ctx context.Context, network, host string) ([]netip.Addr, error)
}

// resolve refreshes a DNS cluster's endpoints until ctx ends. Lookup errors
// keep the last good set (like Envoy's STRICT_DNS).
func (c *cluster) resolve(ctx context.Context, r Resolver, ready func(error)) {
	d := c.cfg.DNS
	refresh := d.Refresh.D
	if refresh == 0 {
		refresh = 5 * time.Second
	}
	static := map[netip.AddrPort]map[string]string{}
	var staticList []netip.AddrPort
	for _, e := range c.cfg.Endpoints {
		ap := netip.MustParseAddrPort(e.Address)
		static[ap] = e.Labels
		staticList = append(staticList, ap)
	}
	once := sync.Once{}
	for {
		lctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		ips, err := r.LookupNetIP(lctx, "ip", d.Name)
		cancel()
		if err == nil {
			addrs := append([]netip.AddrPort(nil), staticList...)
			labels := map[netip.AddrPort]map[string]string{}
			for k, v := range static {
				labels[k] = v
			}
			for _, ip := range ips {
				ap := netip.AddrPortFrom(ip.Unmap(), d.Port)
				addrs = append(addrs, ap)
				labels[ap] = d.Labels
			}
			c.setEndpoints(addrs, labels)
		} else if c.m != nil {
			c.m.dnsFailures.Inc()
		}
		once.Do(func() {
			if err != nil {
				err = fmt.Errorf("resolving %s for cluster %q: %w", d.Name, c.name, err)
			}
			ready(err)
		})
		select {
		case <-ctx.Done():
			return
		case <-time.After(refresh):
		}
	}
}
