package stats

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"testing"
)

// TestSharedAcrossMappings: two mappings of one memfd (as two generations
// have) see and add to the same counters, including concurrent registration
// of the same name.
func TestSharedAcrossMappings(t *testing.T) {
	a, f, err := Create()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b, err := Open(f)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := 0; i < 8; i++ {
		r := a
		if i%2 == 1 {
			r = b
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := 0; j < 1000; j++ {
				r.Counter(fmt.Sprintf(`c_total{n="%d"}`, j%10)).Inc()
			}
		}()
	}
	wg.Wait()
	seen := 0
	b.Each(func(name string, v uint64) {
		seen++
		if v != 800 {
			t.Errorf("%s = %d, want 800", name, v)
		}
	})
	if seen != 10 {
		t.Errorf("%d counters, want 10", seen)
	}
	a.SetNote("reload failed: x")
	if got := b.Note(); got != "reload failed: x" {
		t.Errorf("Note = %q", got)
	}
	var buf bytes.Buffer
	if err := b.WritePrometheus(&buf); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(buf.String(), "# TYPE c_total counter\nc_total{n=\"0\"} 800\n") || strings.Count(buf.String(), "# TYPE c_total") != 1 {
		t.Errorf("exposition:\n%s", buf.String())
	}
}

func TestFullRegionNeverFails(t *testing.T) {
	r := NewPrivate()
	for i := 0; i < Slots+10; i++ {
		r.Counter(fmt.Sprintf("c%d", i)).Inc()
	}
	c := r.Counter("overflow")
	c.Add(3)
	if c.Value() != 3 {
		t.Fatal("overflow counter does not count")
	}
	if d := r.Dropped(); d != 11 {
		t.Errorf("dropped = %d, want 11", d)
	}
}

func BenchmarkCounterInc(b *testing.B) {
	b.ReportAllocs()
	c := NewPrivate().Counter("x")
	for b.Loop() {
		c.Inc()
	}
}

// TestCounterVecShared: a labelled family registered in two mappings (two
// generations) adds into the same series, written once with HELP, labels
// sorted and values escaped; a family whose name another extends keeps its
// series together.
func TestCounterVecShared(t *testing.T) {
	a, f, err := Create()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b, err := Open(f)
	if err != nil {
		t.Fatal(err)
	}
	va := a.CounterVec("req_total", "Requests.", "route", "code")
	vb := b.CounterVec("req_total", "Requests.", "route", "code")
	va.WithLabelValues(`r"1`, "2xx").Add(3)
	vb.WithLabelValues(`r"1`, "2xx").Add(4)
	vb.Curry("r2").WithLabelValues("5xx").Inc()
	b.NewCounter("req", "Bare.").Inc()
	b.NewCounter("req_x_total", "Other.").Inc()
	if got := a.Counter(`req_total{code="2xx",route="r\"1"}`).Value(); got != 7 {
		t.Errorf("shared series = %d, want 7", got)
	}
	var buf bytes.Buffer
	if err := b.WritePrometheus(&buf); err != nil {
		t.Fatal(err)
	}
	want := `# HELP req Bare.
# TYPE req counter
req 1
# HELP req_total Requests.
# TYPE req_total counter
req_total{code="2xx",route="r\"1"} 7
req_total{code="5xx",route="r2"} 1
# HELP req_x_total Other.
# TYPE req_x_total counter
req_x_total 1
`
	if got := buf.String(); !strings.HasPrefix(got, want) {
		t.Errorf("exposition:\n%s\nwant prefix:\n%s", got, want)
	}
	if !strings.Contains(buf.String(), DroppedName+" 0\n") {
		t.Errorf("no %s 0 in:\n%s", DroppedName, buf.String())
	}
}

// TestCounterTooLongIsCounted: a series name longer than a slot is not
// truncated (two long names would share one slot) but counted as dropped.
func TestCounterTooLongIsCounted(t *testing.T) {
	r := NewPrivate()
	long := "x_total{route=\"" + strings.Repeat("r", nameMax) + "\"}"
	r.Counter(long).Inc()
	r.Counter(long + "2").Inc()
	if d := r.Dropped(); d != 2 {
		t.Errorf("dropped = %d, want 2", d)
	}
	r.Each(func(name string, _ uint64) { t.Errorf("unexpected series %q", name) })
}

// TestLazySeries: a lazy series takes no slot and is not exported until it
// is first counted; then it is the same series as WithLabelValues's, in
// every mapping, whichever claimed slots in between.
func TestLazySeries(t *testing.T) {
	a, f, err := Create()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b, err := Open(f)
	if err != nil {
		t.Fatal(err)
	}
	va := a.CounterVec("lazy_total", "help", "cluster")
	vb := b.CounterVec("lazy_total", "help", "cluster")
	lazy := va.Lazy("x")
	names := func(r *Region) (out []string) {
		r.Each(func(name string, _ uint64) { out = append(out, name) })
		return out
	}
	if got := names(b); len(got) != 0 {
		t.Fatalf("before first use the region holds %q", got)
	}
	// b claims two other series after a's index ended, then a counts.
	vb.WithLabelValues("y").Inc()
	a.Counter("other_total").Inc()
	vb.WithLabelValues("z").Inc()
	lazy.Add(2)
	vb.WithLabelValues("x").Inc()
	if got := va.WithLabelValues("x").Value(); got != 3 {
		t.Fatalf(`lazy_total{cluster="x"} = %d in a, want 3`, got)
	}
	if got, want := names(b), []string{`lazy_total{cluster="x"}`, `lazy_total{cluster="y"}`, `lazy_total{cluster="z"}`, "other_total"}; fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("series %q, want %q", got, want)
	}
	if got := va.WithLabelValues("y").Value(); got != 1 {
		t.Fatalf(`a reads lazy_total{cluster="y"} = %d, want 1 (b's)`, got)
	}
}
