package route

import (
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshlet/meshlet/proxy/stats"
)

// Metrics are a route's series towards one cluster. They are resolved at
// the route's first request of each status class, not when the route is
// compiled: a sidecar configured with 1,000 services that calls a few of
// them holds the series of those few (memory, stats region slots), and the
// request path still looks no labels up once a series is resolved.
type Metrics struct {
	byClass  [6]atomic.Pointer[stats.Counter] // 1xx..5xx, and [0] for others (499 etc.)
	duration atomic.Pointer[prometheus.Observer]
	counter  func(class string) *stats.Counter
	observer func() prometheus.Observer
}

var classes = [...]string{"other", "1xx", "2xx", "3xx", "4xx", "5xx"}

// NewMetrics returns a route's series: counter returns the request counter
// of a code_class label value ("1xx" … "5xx", "other" for anything else,
// such as 499), duration the latency observer; each is called once, when
// its series is first needed.
func NewMetrics(counter func(class string) *stats.Counter, duration func() prometheus.Observer) *Metrics {
	return &Metrics{counter: counter, observer: duration}
}

// Observe counts a finished request with status that took d.
func (m *Metrics) Observe(status int, d time.Duration) {
	i := status / 100
	if i < 1 || i > 5 {
		i = 0
	}
	c := m.byClass[i].Load()
	if c == nil {
		c = m.counter(classes[i]) // the same counter if two requests race here
		m.byClass[i].Store(c)
	}
	c.Inc()
	o := m.duration.Load()
	if o == nil {
		ob := m.observer()
		o = &ob
		m.duration.Store(o)
	}
	(*o).Observe(d.Seconds())
}
