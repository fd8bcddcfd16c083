package l7

import (
	"sync"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshlet/meshlet/proxy/l7/route"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
	"github.com/meshlet/meshlet/proxy/stats"
)

// metrics are the engine's series. Counters live in the shared stats region
// (they never reset across hot restarts); the latency histogram and the
// endpoint gauge describe this generation and are Prometheus collectors.
// Per-request series are resolved once per (route, cluster) so the request
// path does no label lookups.
type metrics struct {
	requests    *stats.CounterVec
	duration    *prometheus.HistogramVec
	retries     *stats.CounterVec
	budgetOut   *stats.CounterVec
	overflow    *stats.CounterVec
	ejections   *stats.CounterVec
	connFail    *stats.CounterVec
	tlsFail     *stats.CounterVec
	hcFail      *stats.CounterVec
	dnsFail     *stats.CounterVec
	mirrored    *stats.CounterVec
	endpoints   *prometheus.GaugeVec
	faults      *stats.CounterVec
	noRoute     *stats.Counter
	noCluster   *stats.Counter
	handoffs    *stats.CounterVec
	notMoved    *stats.CounterVec
	rbacDenied  *stats.CounterVec
	mu          sync.Mutex
	clusters    map[string]*upstream.Metrics
	routeFaults sync.Map // route key + kind → *stats.Counter
	// routes are the series of the routes of the table being compiled and
	// of the current one, so an Update that recompiles every route looks no
	// labels up for the unchanged ones; keepRoutes forgets the others.
	routes, nextRoutes map[routeSeries]*route.Metrics
}

func newMetrics(r *stats.Region) *metrics {
	m := &metrics{clusters: map[string]*upstream.Metrics{}}
	m.requests = r.CounterVec("meshlet_l7_requests_total",
		"HTTP/gRPC requests by direction, route, cluster and status class.", "direction", "route", "cluster", "code_class")
	m.duration = prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "meshlet_l7_request_duration_seconds",
		Help:    "Request latency from first byte in to the end of the response.",
		Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}},
		[]string{"direction", "route", "cluster"})
	cv := r.CounterVec
	m.retries = cv("meshlet_l7_upstream_retries_total", "Retried upstream attempts by cluster.", "cluster")
	m.budgetOut = cv("meshlet_l7_upstream_retry_budget_exhausted_total", "Retries refused by the retry budget.", "cluster")
	m.overflow = cv("meshlet_l7_upstream_overflow_total", "Requests refused by the circuit breaker, by limit.", "cluster", "limit")
	m.ejections = cv("meshlet_l7_outlier_ejections_total", "Endpoints ejected by outlier detection.", "cluster")
	m.connFail = cv("meshlet_l7_upstream_connect_failures_total", "Failed upstream connection attempts.", "cluster")
	m.tlsFail = cv("meshlet_l7_upstream_tls_handshake_failures_total", "Failed upstream TLS handshakes (also counted as connect failures).", "cluster")
	m.hcFail = cv("meshlet_l7_health_check_failures_total", "Endpoints marked unhealthy by active health checks.", "cluster")
	m.dnsFail = cv("meshlet_l7_dns_failures_total", "Failed DNS resolutions of DNS clusters.", "cluster")
	m.mirrored = cv("meshlet_l7_mirrored_requests_total", "Requests mirrored to a cluster.", "cluster")
	m.faults = cv("meshlet_l7_faults_injected_total", "Injected faults by route and kind (delay, abort).", "route", "kind")
	m.endpoints = prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "meshlet_l7_cluster_endpoints",
		Help: "Endpoints known per cluster."}, []string{"cluster"})
	m.noRoute = r.NewCounter("meshlet_l7_no_route_total",
		"Requests that matched a service but none of its routes (404).")
	m.noCluster = r.NewCounter("meshlet_l7_no_cluster_total",
		"Requests whose route names a cluster the configuration does not define (503, flag NC).")
	m.handoffs = cv("meshlet_l7_downstream_handoffs_total", "Downstream connections the HTTP/1.1 codec handed to "+
		"net/http's server, by what the request needed: http2, http1.0, upgrade, expect, transfer_encoding, "+
		"large_body, large_head, other (malformed or unusual requests, answered by net/http).", "reason")
	m.notMoved = cv("meshlet_l7_drain_not_moved_total", "HTTP/1.1 connections a hot restart could not move to the "+
		"next generation, which then ended with Connection: close on their next response, by why: not_movable "+
		"(TLS or another wrapped connection), send_failed, successor_l4_only.", "reason")
	m.rbacDenied = cv("meshlet_rbac_denied_total", "Inbound requests and connections denied by authorization, by the deciding "+
		"policy (empty: no ALLOW policy matched).", "policy")
	return m
}

func (m *metrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.duration, m.endpoints}
}

func (m *metrics) cluster(name string) *upstream.Metrics {
	m.mu.Lock()
	defer m.mu.Unlock()
	if c := m.clusters[name]; c != nil {
		return c
	}
	// The counters are claimed in the stats region when first counted
	// (most clusters of a large mesh never retry, eject or fail).
	c := &upstream.Metrics{
		Retries:              m.retries.Lazy(name),
		RetryBudgetExhausted: m.budgetOut.Lazy(name),
		Ejections:            m.ejections.Lazy(name),
		ConnectFailures:      m.connFail.Lazy(name),
		TLSFailures:          m.tlsFail.Lazy(name),
		HCFailures:           m.hcFail.Lazy(name),
		DNSFailures:          m.dnsFail.Lazy(name),
		Mirrored:             m.mirrored.Lazy(name),
		Overflow:             m.overflow.Curry(name),
		Endpoints:            m.endpoints.WithLabelValues(name),
	}
	m.clusters[name] = c
	return c
}

// dropCluster forgets the gauge of a cluster an Update removed (its
// counters stay: they never go back).
func (m *metrics) dropCluster(name string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.endpoints.DeleteLabelValues(name)
	delete(m.clusters, name)
}

// routeSeries names a route's series towards one cluster.
type routeSeries struct{ dir, route, cluster string }

// route returns the series of route rt towards cluster in direction dir,
// resolved once while the route stays in the configuration (only Update,
// serialized, calls it).
func (m *metrics) route(dir, rt, cluster string) *route.Metrics {
	k := routeSeries{dir, rt, cluster}
	rm := m.routes[k]
	if rm == nil {
		rm = route.NewMetrics(func(class string) *stats.Counter { return m.requests.WithLabelValues(dir, rt, cluster, class) },
			func() prometheus.Observer { return m.duration.WithLabelValues(dir, rt, cluster) })
	}
	if m.nextRoutes == nil {
		m.nextRoutes = map[routeSeries]*route.Metrics{}
	}
	m.nextRoutes[k] = rm
	return rm
}

// keepRoute keeps the series of r, a compiled route the table being
// compiled takes over unchanged.
func (m *metrics) keepRoute(r *route.Route) {
	if m.nextRoutes == nil {
		m.nextRoutes = map[routeSeries]*route.Metrics{}
	}
	for c, rm := range r.Metrics {
		m.nextRoutes[routeSeries{"outbound", r.Key, c.Name()}] = rm
	}
}

// beginRoutes starts the compilation of a table (a failed one may have
// left series behind).
func (m *metrics) beginRoutes() { m.nextRoutes = nil }

// keepRoutes makes the route series the last compiled table asked for the
// ones route finds next time.
func (m *metrics) keepRoutes() {
	m.routes, m.nextRoutes = m.nextRoutes, nil
}

// fault counts an injected fault of kind (delay, abort) on the route
// keyed routeKey.
func (m *metrics) fault(routeKey, kind string) {
	key := routeKey + "\x00" + kind
	if c, ok := m.routeFaults.Load(key); ok {
		c.(*stats.Counter).Inc()
		return
	}
	c := m.faults.WithLabelValues(routeKey, kind)
	m.routeFaults.Store(key, c)
	c.Inc()
}
