package route

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshlet/meshlet/proxy/stats"
)

// Metrics are a route's series towards one cluster, resolved when the
// route is compiled so that a request looks no labels up.
type Metrics struct {
	byClass  [6]*stats.Counter // 1xx..5xx, and [0] for others (499 etc.)
	duration prometheus.Observer
}

// NewMetrics resolves a route's series: counter returns the request
// counter of a code_class label value ("1xx" … "5xx", "other" for anything
// else, such as 499), duration observes latency.
func NewMetrics(counter func(class string) *stats.Counter, duration prometheus.Observer) *Metrics {
	m := &Metrics{duration: duration}
	for i, class := range [...]string{"other", "1xx", "2xx", "3xx", "4xx", "5xx"} {
		m.byClass[i] = counter(class)
	}
	return m
}

// Observe counts a finished request with status that took d.
func (m *Metrics) Observe(status int, d time.Duration) {
	i := status / 100
	if i < 1 || i > 5 {
		i = 0
	}
	m.byClass[i].Inc()
	m.duration.Observe(d.Seconds())
}
