package server

import (
	"fmt"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	pushes        *prometheus.CounterVec
	pushDuration  prometheus.Histogram
	proxiesPushed prometheus.Counter
	connected     prometheus.Gauge
	acks, nacks   *prometheus.CounterVec
	warnings      prometheus.Gauge
}

func newMetrics(reg *prometheus.Registry) *metrics {
	m := &metrics{
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshlet_discovery_pushes_total",
			Help: "Pushes (recompile and snapshot every connected proxy), by reason."}, []string{"reason"}),
		pushDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "meshlet_discovery_push_duration_seconds",
			Help: "Time to recompile and set the snapshots of every connected proxy.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		proxiesPushed: prometheus.NewCounter(prometheus.CounterOpts{Name: "meshlet_discovery_proxy_pushes_total",
			Help: "Snapshots set for proxies whose resources changed (unchanged proxies are not pushed)."}),
		connected: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshlet_discovery_connected_proxies",
			Help: "Proxies with an open ADS stream to this replica."}),
		acks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshlet_discovery_xds_acks_total",
			Help: "Responses acknowledged by proxies, by type."}, []string{"type"}),
		nacks: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "meshlet_discovery_xds_nacks_total",
			Help: "Responses rejected by proxies, by type."}, []string{"type"}),
		warnings: prometheus.NewGauge(prometheus.GaugeOpts{Name: "meshlet_discovery_config_warnings",
			Help: "Istio resources (or parts) refused by the last translation."}),
	}
	reg.MustRegister(m.pushes, m.pushDuration, m.proxiesPushed, m.connected, m.acks, m.nacks, m.warnings)
	return m
}

// cacheLogger adapts logr to go-control-plane's logger. A message is
// formatted only when its level is enabled: the snapshot cache logs every
// delta watch it opens with the subscribed names (a thousand EDS names per
// ACK at a thousand Services), and formatting those for a discarded
// message was most of a delta EDS push's CPU.
type cacheLogger struct{ l logr.Logger }

func (c cacheLogger) Debugf(format string, args ...any) { c.logf(c.l.V(1), format, args) }
func (c cacheLogger) Infof(format string, args ...any)  { c.logf(c.l, format, args) }
func (c cacheLogger) Warnf(format string, args ...any)  { c.logf(c.l, format, args) }
func (c cacheLogger) Errorf(format string, args ...any) {
	c.l.Error(fmt.Errorf(format, args...), "xds cache")
}

func (c cacheLogger) logf(l logr.Logger, format string, args []any) {
	if l.Enabled() {
		l.Info(fmt.Sprintf(format, args...))
	}
}
