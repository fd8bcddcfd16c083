package stats

import (
	"fmt"
	"sort"
	"strings"
	"sync"
)

// CounterVec is a labelled counter family whose series live in a Region, so
// every generation adds into the same totals. Series are claimed on first
// use and then cached, so the hot path does no lookups once callers keep
// the *Counter.
type CounterVec struct {
	r      *Region
	name   string
	labels []string
	mu     sync.Mutex
	series map[string]*Counter
}

// CounterVec returns the family name with the given label names, recording
// help for the exposition. Calling it again with the same name returns a
// family adding into the same series.
func (r *Region) CounterVec(name, help string, labels ...string) *CounterVec {
	r.mu.Lock()
	r.help[name] = help
	r.mu.Unlock()
	return &CounterVec{r: r, name: name, labels: labels, series: map[string]*Counter{}}
}

// NewCounter returns the family name without labels, recording help.
func (r *Region) NewCounter(name, help string) *Counter {
	return r.CounterVec(name, help).WithLabelValues()
}

// WithLabelValues returns the series with the given label values, in the
// order of the family's label names. A wrong number of values is a
// programming error and panics, as client_golang's does.
func (v *CounterVec) WithLabelValues(values ...string) *Counter {
	v.checkValues(values)
	key := strings.Join(values, "\x00")
	v.mu.Lock()
	defer v.mu.Unlock()
	if c, ok := v.series[key]; ok {
		return c
	}
	c := v.r.Counter(SeriesName(v.name, v.labels, values))
	v.series[key] = c
	return c
}

// Lazy is WithLabelValues for a series that may never be used (one per
// configured cluster or route, most of which see no traffic): the series
// is claimed in the region, and appears in the exposition, at the
// counter's first Add, Inc or Value. A family of a series per cluster of a
// 1,000-service mesh then costs region slots and memory only for the
// series in use.
func (v *CounterVec) Lazy(values ...string) *Counter {
	v.checkValues(values)
	return &Counter{vec: v, values: values}
}

// checkValues panics unless values has one value per label of the family.
func (v *CounterVec) checkValues(values []string) {
	if len(values) != len(v.labels) {
		panic(fmt.Sprintf("stats: %s has %d labels %v, got %d values %q", v.name, len(v.labels), v.labels, len(values), values))
	}
}

// Curry returns the family with the first label values fixed; the result's
// WithLabelValues takes the remaining values.
func (v *CounterVec) Curry(values ...string) *CurriedVec {
	return &CurriedVec{v: v, fixed: values}
}

// CurriedVec is a CounterVec with leading label values fixed.
type CurriedVec struct {
	v     *CounterVec
	fixed []string
}

// WithLabelValues returns the series with the fixed values followed by
// values.
func (c *CurriedVec) WithLabelValues(values ...string) *Counter {
	return c.v.WithLabelValues(append(append([]string(nil), c.fixed...), values...)...)
}

// SeriesName is the Prometheus series name of name with labels set to
// values: labels sorted by name (as client_golang writes them), values
// escaped as the text format requires.
func SeriesName(name string, labels, values []string) string {
	if len(labels) == 0 {
		return name
	}
	order := make([]int, len(labels))
	for i := range order {
		order[i] = i
	}
	sort.Slice(order, func(a, b int) bool { return labels[order[a]] < labels[order[b]] })
	var b strings.Builder
	b.WriteString(name)
	b.WriteByte('{')
	for n, i := range order {
		if n > 0 {
			b.WriteByte(',')
		}
		b.WriteString(labels[i])
		b.WriteString(`="`)
		b.WriteString(labelEscaper.Replace(values[i]))
		b.WriteByte('"')
	}
	b.WriteByte('}')
	return b.String()
}

var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

func escapeHelp(s string) string {
	return strings.NewReplacer(`\`, `\\`, "\n", `\n`).Replace(s)
}
