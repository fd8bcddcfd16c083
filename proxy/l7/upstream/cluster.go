package upstream

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

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7/grpcwire"
	"github.com/meshlet/meshlet/proxy/stats"
)

// Endpoint is one upstream address and its load/health state, shared by all
// subsets that select it.
type Endpoint struct {
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

// Addr is the endpoint's ip:port.
func (e *Endpoint) Addr() string { return e.addr }

// Begin counts an attempt sent to e (its load for the balancers).
func (e *Endpoint) Begin() {
	e.inflight.Add(1)
	e.picked.Add(1)
}

// End ends an attempt Begin counted.
func (e *Endpoint) End() { e.inflight.Add(-1) }

// Picked is the number of attempts sent to e (tests and debugging).
func (e *Endpoint) Picked() uint64 { return e.picked.Load() }

// Unhealthy reports whether active health checks took e out of the pool.
func (e *Endpoint) Unhealthy() bool { return e.unhealthy.Load() }

// Ejected reports whether outlier detection ejected e (the ejection may
// have ended; the next pick returns it to the pool).
func (e *Endpoint) Ejected() bool { return e.ejected.Load() }

func (e *Endpoint) available(now time.Time) bool {
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

// ObserveRTT feeds the Peak-EWMA balancer an attempt's response time.
func (e *Endpoint) ObserveRTT(rtt time.Duration, now time.Time) {
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

func (e *Endpoint) ewmaCost() float64 {
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
	eps atomic.Pointer[[]*Endpoint]
	rr  atomic.Uint64
}

func (p *pool) list() []*Endpoint {
	if l := p.eps.Load(); l != nil {
		return *l
	}
	return nil
}

// pick chooses an endpoint with the balancer lb, skipping ejected and
// unhealthy endpoints unless none is left (then all are candidates — Envoy's
// panic mode — so a fully failing cluster still gets traffic and recovers).
// skip is avoided if possible (the previous attempt's endpoint on retry).
func (p *pool) pick(lb string, skip *Endpoint, now time.Time) *Endpoint {
	eps := p.list()
	switch len(eps) {
	case 0:
		return nil
	case 1:
		return eps[0]
	}
	var buf [32]*Endpoint
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

// Cluster is the runtime form of a configured cluster (or of the
// original-destination inbound and passthrough clusters): endpoints and
// subsets, balancer, circuit breaker, outlier detection, health checks,
// connection pools and TLS origination. It is safe for concurrent use.
type Cluster struct {
	name     string
	origDst  bool // endpoints are requests' original destinations
	cfg      config.Cluster
	lb       string
	all      pool
	subsets  map[string]*pool
	outlier  *config.OutlierDetection
	h1, h2   *http.Transport
	direct   *h1Transport // HTTP/1.1 fast path (small bodies, no upgrade)
	tls      *TLS         // nil: plain text
	mesh     *MeshTLS     // ISTIO_MUTUAL (nil: none)
	proto    string       // http1 | http2 | auto
	active   atomic.Int64
	pending  atomic.Int64
	maxReq   int64
	maxPend  int64
	maxConns int
	m        *Metrics

	epMu   sync.Mutex
	byKey  map[string]*Endpoint
	static []config.Endpoint // the static endpoints in use (config or UpdateEndpoints)

	stop  context.CancelFunc // ends the cluster's background work (nil: none started)
	clock func() time.Time   // outlier ejection time (nil: time.Now; tests move it)
}

// Name is the cluster's configured name.
func (c *Cluster) Name() string { return c.name }

// Config is the configuration c was built from; callers must not modify it.
func (c *Cluster) Config() *config.Cluster { return &c.cfg }

// Metrics are c's series (nil: none).
func (c *Cluster) Metrics() *Metrics { return c.m }

// Protocol is what c speaks to its endpoints: http1, http2 or auto (the
// request's protocol).
func (c *Cluster) Protocol() string { return c.proto }

// TLS is c's TLS origination (nil: plain text).
func (c *Cluster) TLS() *TLS { return c.tls }

// Endpoints returns the cluster's current endpoints.
func (c *Cluster) Endpoints() []*Endpoint { return c.all.list() }

// FastPathPool describes the HTTP/1.1 fast path's connections to one
// endpoint (tests and debugging).
type FastPathPool struct {
	// Idle connections, Live of them passing the check a reuse makes (the
	// server has not closed them), and Open connections, idle or busy.
	Idle, Live, Open int
}

// FastPathPool reports the fast path's pool of the endpoint addr; false
// when it keeps none for addr.
func (c *Cluster) FastPathPool(addr string) (FastPathPool, bool) {
	t := c.direct
	t.mu.Lock()
	defer t.mu.Unlock()
	h := t.hosts[addr]
	if h == nil {
		return FastPathPool{}, false
	}
	fp := FastPathPool{Idle: len(h.idle), Open: h.conns}
	for _, pc := range h.idle {
		if pc.alive() {
			fp.Live++
		}
	}
	return fp, true
}

// Admit takes a slot of the circuit breaker's concurrent requests for one
// request; false (counted as an overflow) when the limit is reached.
func (c *Cluster) Admit() bool {
	if n := c.active.Add(1); c.maxReq > 0 && n > c.maxReq {
		c.active.Add(-1)
		if c.m != nil {
			c.m.Overflow.WithLabelValues("requests").Inc()
		}
		return false
	}
	return true
}

// Release gives back a slot Admit took.
func (c *Cluster) Release() { c.active.Add(-1) }

// Active is the number of requests holding a circuit breaker slot.
func (c *Cluster) Active() int64 { return c.active.Load() }

// Pending is the number of requests waiting for a connection.
func (c *Cluster) Pending() int64 { return c.pending.Load() }

// LimitsPending reports whether c has a maxPendingRequests limit (an
// attempt then needs a cancelable context for TracePending).
func (c *Cluster) LimitsPending() bool { return c.maxPend > 0 }

// Pick chooses the endpoint of one attempt of a request to the original
// destination dst for subset ("": all endpoints), avoiding skip (the
// previous attempt's) when it can; nil when the pool is empty. The
// original-destination clusters return dst itself.
func (c *Cluster) Pick(subset string, dst netip.AddrPort, skip *Endpoint) *Endpoint {
	if c.origDst {
		return c.origDest(dst)
	}
	return c.pool(subset).pick(c.lb, skip, c.now())
}

// now is the time outlier ejections are measured in.
func (c *Cluster) now() time.Time {
	if c.clock != nil {
		return c.clock()
	}
	return time.Now()
}

// StaticEndpoints returns the static endpoints the cluster serves.
func (c *Cluster) StaticEndpoints() []config.Endpoint {
	c.epMu.Lock()
	defer c.epMu.Unlock()
	return c.static
}

// SetStatic replaces the static endpoints (validated addresses).
func (c *Cluster) SetStatic(eps []config.Endpoint) {
	addrs := make([]netip.AddrPort, 0, len(eps))
	labels := make(map[netip.AddrPort]map[string]string, len(eps))
	for _, e := range eps {
		ap := netip.MustParseAddrPort(e.Address) // validated
		addrs = append(addrs, ap)
		labels[ap] = e.Labels
	}
	c.SetEndpoints(addrs, labels)
	c.SetTLSModes(eps)
	c.epMu.Lock()
	c.static = slices.Clone(eps)
	c.epMu.Unlock()
}

// Retire stops the background work of a cluster an Update replaced and
// closes its idle upstream connections; requests still using it finish.
func (c *Cluster) Retire() {
	if c.stop != nil {
		c.stop()
	}
	c.CloseIdle()
}

// CloseIdle closes c's idle upstream connections and its HTTP/1.1 fast
// path's pool (the engine's Close, after its servers stopped).
func (c *Cluster) CloseIdle() {
	c.h1.CloseIdleConnections()
	c.h2.CloseIdleConnections()
	c.direct.close()
}

// Errors of an upstream attempt (the engine maps them to status codes and
// access-log flags).
var (
	// ErrOverflow: the circuit breaker's concurrent request limit.
	ErrOverflow = errors.New("upstream overflow: circuit breaker open (max requests)")
	// ErrPendingFull: the circuit breaker's pending request limit.
	ErrPendingFull = errors.New("upstream overflow: circuit breaker open (max pending requests)")
	// ErrNoEndpoint: the pool is empty.
	ErrNoEndpoint = errors.New("no healthy upstream")
	// ErrPerTryTimeout: an attempt's per-try timeout.
	ErrPerTryTimeout = errors.New("upstream per-try timeout")
)

// ConnectError marks a failure to establish the upstream connection.
type ConnectError struct{ Err error }

// Error says the connection failed, and why.
func (e *ConnectError) Error() string { return "upstream connect failure: " + e.Err.Error() }

// Unwrap returns the dial or handshake error.
func (e *ConnectError) Unwrap() error { return e.Err }

// DialFunc dials an upstream. dir tells inbound (to the local app, which the
// sidecar dials from 127.0.0.6) from outbound.
type DialFunc func(ctx context.Context, dir l4.Direction, network, addr string) (net.Conn, error)

// Metrics are a cluster's series, resolved once per cluster by the engine
// so that no request looks labels up.
type Metrics struct {
	Retries, RetryBudgetExhausted, Ejections, ConnectFailures, TLSFailures, HCFailures, DNSFailures, Mirrored *stats.Counter
	// Overflow counts circuit breaker refusals by limit (requests, pending).
	Overflow *stats.CurriedVec
	// Endpoints is the number of endpoints the cluster knows.
	Endpoints prometheus.Gauge
}

// Options are what a cluster needs besides its configuration.
type Options struct {
	// Direction of the cluster's traffic: Inbound dials the local app.
	Direction l4.Direction
	// Dial connects to endpoints.
	Dial DialFunc
	// Metrics receives the cluster's series (nil: none).
	Metrics *Metrics
	// TLS originates TLS to the endpoints (nil: plain text); see NewTLS.
	TLS *TLS
	// Mesh is mutual TLS with the workload identity (tls.mode
	// ISTIO_MUTUAL; nil: none); see NewMeshTLS.
	Mesh *MeshTLS
	// OriginalDst: the endpoint of a request is its original destination
	// (the inbound and passthrough clusters); cfg has no endpoints.
	OriginalDst bool
	// Clock replaces time.Now for outlier ejection intervals (tests).
	Clock func() time.Time
}

// New builds the cluster cfg describes (cfg is validated). Its background
// work (DNS, health checks) starts with Start.
func New(cfg config.Cluster, o Options) *Cluster {
	m, ut := o.Metrics, o.TLS
	c := &Cluster{
		name:    cfg.Name,
		origDst: o.OriginalDst,
		clock:   o.Clock,
		cfg:     cfg,
		lb:      cfg.LoadBalancer,
		outlier: cfg.Outlier,
		proto:   cfg.Protocol,
		maxReq:  int64(cfg.Pool.MaxRequests),
		maxPend: int64(cfg.Pool.MaxPendingRequests),
		m:       m,
		tls:     ut,
		byKey:   map[string]*Endpoint{},
	}
	if c.lb == "" {
		c.lb = config.LBRoundRobin
	}
	if c.proto == "" {
		c.proto = "auto"
	}
	c.maxConns = cfg.Pool.MaxConnections
	c.mesh = o.Mesh
	c.h1, c.h2, c.direct = newTransports(cfg.Pool, o.Direction, o.Dial, m, cfg.Endpoints, ut, o.Mesh)
	c.SetStatic(cfg.Endpoints)
	return c
}

func newTransports(pc config.ConnectionPool, dir l4.Direction, dial DialFunc, m *Metrics, eps []config.Endpoint, ut *TLS, mt *MeshTLS) (h1, h2 *http.Transport, direct *h1Transport) {
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
				m.ConnectFailures.Inc()
			}
			return nil, &ConnectError{Err: err}
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
	if mt != nil {
		mt.setup(h1, h2, direct, dialFn, connectTimeout)
	}
	return h1, h2, direct
}

// Scheme is the URL scheme of requests to c's endpoints: https makes
// net/http's transports dial with TLS.
func (c *Cluster) Scheme() string {
	if c.tls != nil {
		return "https"
	}
	return "http"
}

// SetEndpoints replaces the endpoint set, keeping the state of endpoints that
// stay, and recomputes the subsets.
func (c *Cluster) SetEndpoints(addrs []netip.AddrPort, labels map[netip.AddrPort]map[string]string) {
	c.epMu.Lock()
	defer c.epMu.Unlock()
	next := map[string]*Endpoint{}
	list := make([]*Endpoint, 0, len(addrs))
	for _, ap := range addrs {
		key := ap.String()
		if next[key] != nil {
			continue
		}
		e := c.byKey[key]
		if e == nil {
			e = &Endpoint{addr: key}
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
		var sl []*Endpoint
		for _, e := range list {
			if selects(s.Labels, e.labels) {
				sl = append(sl, e)
			}
		}
		c.subsets[s.Name].eps.Store(&sl)
	}
	if c.m != nil {
		c.m.Endpoints.Set(float64(len(list)))
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

func (c *Cluster) pool(subset string) *pool {
	if subset == "" {
		return &c.all
	}
	return c.subsets[subset]
}

// Transport is the transport of an attempt of r: HTTP/2 for http2
// clusters and (protocol auto) for HTTP/2 and gRPC requests, the HTTP/1.1
// fast path for the small requests it serves, net/http's otherwise.
func (c *Cluster) Transport(r *http.Request) http.RoundTripper {
	switch {
	case c.proto == "http2", c.proto == "auto" && (r.ProtoMajor == 2 || grpcwire.IsGRPC(r)):
		return c.h2
	case c.direct.canServe(r):
		return c.direct
	}
	return c.h1
}

// Outcome of one upstream attempt, for outlier detection.
type Outcome int

// The outcomes.
const (
	OutcomeOK      Outcome = iota
	Outcome5xx             // a 5xx other than 502, 503, 504
	OutcomeGateway         // 502, 503, 504
	OutcomeConnect         // connect failure (also a gateway error)
	OutcomeLocal           // not the endpoint's fault (client cancel, our timeout)
)

// Measured reports whether an attempt with outcome o measured the
// endpoint's response time (it answered, or timed out).
func (o Outcome) Measured() bool { return o == OutcomeOK || o == Outcome5xx || o == OutcomeGateway }

// Record feeds passive outlier detection.
func (c *Cluster) Record(e *Endpoint, o Outcome) {
	od := c.outlier
	if od == nil || o == OutcomeLocal {
		return
	}
	e.outMu.Lock()
	switch o {
	case OutcomeOK:
		e.consec5xx, e.consecGw, e.consecConn = 0, 0, 0
		e.outMu.Unlock()
		return
	case Outcome5xx:
		e.consec5xx++
		e.consecGw = 0
	case OutcomeGateway:
		e.consec5xx++
		e.consecGw++
	case OutcomeConnect:
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
		c.m.Ejections.Inc()
	}
}

// Start begins c's background work under ctx, tracked by wg: the DNS
// refresh of a dns cluster (r resolves) and active health checks (dial
// connects tcp probes). The channel, nil when c has no DNS name, receives
// the first resolution's error (nil: resolved). Retire stops it.
func (c *Cluster) Start(ctx context.Context, wg *sync.WaitGroup, r Resolver, dial DialFunc) <-chan error {
	if c.cfg.DNS == nil && c.cfg.HealthCheck == nil {
		return nil
	}
	ctx, c.stop = context.WithCancel(ctx)
	var ready chan error
	if c.cfg.DNS != nil {
		ready = make(chan error, 1)
		wg.Go(func() { c.resolve(ctx, r, func(err error) { ready <- err }) })
	}
	if c.cfg.HealthCheck != nil {
		wg.Go(func() { c.healthCheck(ctx, dial) })
	}
	return ready
}

// healthCheck probes every endpoint of c until ctx ends.
func (c *Cluster) healthCheck(ctx context.Context, dial DialFunc) {
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
	probe := func(e *Endpoint) bool {
		if hc.Type == "grpc" {
			return grpcHealthCheck(ctx, c.h2, c.Scheme()+"://"+e.addr, hc.ServiceName, timeout) == nil
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
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.Scheme()+"://"+e.addr+path, nil)
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
							c.m.HCFailures.Inc()
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
func (c *Cluster) resolve(ctx context.Context, r Resolver, ready func(error)) {
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
			c.SetEndpoints(addrs, labels)
		} else if c.m != nil {
			c.m.DNSFailures.Inc()
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
