package xds

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshlet/meshlet/proxy/stats"
)

// Metrics are the client's meshlet_xds_* series: counters in a stats region
// (monotonic across generations), gauges and the histogram per generation.
// A nil *Metrics records nothing.
type Metrics struct {
	connectedG  prometheus.Gauge
	persistedG  prometheus.Gauge
	updates     *stats.CounterVec
	lastUpdate  prometheus.Gauge
	applyTime   prometheus.Histogram
	reconnects  *stats.Counter
	collectorsL []prometheus.Collector
}

// NewMetrics returns the client's metrics, its counters in r (nil: a
// private region).
func NewMetrics(r *stats.Region) *Metrics {
	if r == nil {
		r = stats.NewPrivate()
	}
	m := &Metrics{
		connectedG: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshlet_xds_connected",
			Help: "1 while the ADS stream to the discovery server is established."}),
		persistedG: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshlet_xds_persisted_config",
			Help: "1 while the proxy serves the configuration persisted in its runtime volume, not yet updated by the control plane."}),
		updates: r.CounterVec("meshlet_xds_updates_total",
			"xDS responses by type (lds, rds, cds, eds) and result (applied: ACKed and serving; rejected: NACKed).", "type", "result"),
		lastUpdate: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshlet_xds_last_update_timestamp_seconds",
			Help: "Unix time of the last applied xDS update."}),
		applyTime: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "meshlet_xds_push_to_applied_seconds",
			Help:    "Time from receiving an xDS response to its configuration serving.",
			Buckets: []float64{.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5}}),
		reconnects: r.NewCounter("meshlet_xds_reconnects_total",
			"ADS streams that ended and were retried."),
	}
	for _, t := range []string{"lds", "rds", "cds", "eds"} {
		for _, r := range []string{"applied", "rejected"} {
			m.updates.WithLabelValues(t, r)
		}
	}
	m.collectorsL = []prometheus.Collector{m.connectedG, m.persistedG, m.lastUpdate, m.applyTime}
	return m
}

// Collectors returns the per-generation collectors to register (the
// counters are in the region given to NewMetrics).
func (m *Metrics) Collectors() []prometheus.Collector { return m.collectorsL }

func (m *Metrics) connected(v bool) {
	if m != nil {
		m.connectedG.Set(b2f(v))
	}
}

func (m *Metrics) persisted(v bool) {
	if m != nil {
		m.persistedG.Set(b2f(v))
	}
}

func (m *Metrics) applied(typeURL string, took time.Duration, at time.Time) {
	if m == nil {
		return
	}
	m.updates.WithLabelValues(metricType(typeURL), "applied").Inc()
	m.applyTime.Observe(took.Seconds())
	m.lastUpdate.Set(float64(at.UnixNano()) / 1e9)
	m.persistedG.Set(0)
}

func (m *Metrics) rejected(typeURL string) {
	if m != nil {
		m.updates.WithLabelValues(metricType(typeURL), "rejected").Inc()
	}
}

func (m *Metrics) reconnect() {
	if m != nil {
		m.reconnects.Inc()
	}
}

func b2f(v bool) float64 {
	if v {
		return 1
	}
	return 0
}
