package server

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the webhook's Prometheus metrics. Dry-run requests are counted
// in RequestsTotal (dry_run="true") and in the latency histogram, never as
// injections, skips or denials: those count only what really happened.
type Metrics struct {
	RequestsTotal   *prometheus.CounterVec
	InjectionsTotal prometheus.Counter
	SkipsTotal      *prometheus.CounterVec
	DenialsTotal    *prometheus.CounterVec
	ErrorsTotal     *prometheus.CounterVec
	Duration        prometheus.Histogram
	ConfigReloads   *prometheus.CounterVec
	ConfigValid     prometheus.Gauge
}

// DurationBuckets are the latency histogram's buckets, in seconds: 0.1 ms to
// one second, dense around the millisecond an admission should take.
var DurationBuckets = []float64{0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1}

// NewMetrics creates the metrics and registers them with reg (if not nil).
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		RequestsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_webhook_requests_total",
			Help: "Admission requests received, by whether they were dry-run.",
		}, []string{"dry_run"}),
		InjectionsTotal: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshlet_webhook_injections_total",
			Help: "Pods injected (dry-run requests excluded).",
		}),
		SkipsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_webhook_skips_total",
			Help: "Pods admitted without injection, by reason (dry-run requests excluded).",
		}, []string{"reason"}),
		DenialsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_webhook_denials_total",
			Help: "Pods rejected, by reason (dry-run requests excluded).",
		}, []string{"reason"}),
		ErrorsTotal: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_webhook_errors_total",
			Help: "Requests that failed inside the webhook, by stage (decode, namespace, encode).",
		}, []string{"stage"}),
		Duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "meshlet_webhook_admission_duration_seconds",
			Help:    "Time to handle one admission request, decode to response, in seconds (millisecond buckets).",
			Buckets: DurationBuckets,
		}),
		ConfigReloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_webhook_config_reloads_total",
			Help: "Injection config reloads, by result (success, failure: the last good config keeps serving).",
		}, []string{"result"}),
		ConfigValid: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshlet_webhook_config_last_reload_successful",
			Help: "1 if the injection config file currently on disk is the one in use, 0 if it was rejected.",
		}),
	}
	if reg != nil {
		reg.MustRegister(m.RequestsTotal, m.InjectionsTotal, m.SkipsTotal, m.DenialsTotal, m.ErrorsTotal,
			m.Duration, m.ConfigReloads, m.ConfigValid)
	}
	return m
}
