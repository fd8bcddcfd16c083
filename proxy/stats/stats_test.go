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
	if !strings.HasPrefix(buf.String(), "# TYPE c_total counter\nc_total{n=\"0\"} 800\n") || strings.Count(buf.String(), "# TYPE") != 1 {
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
}

func BenchmarkCounterInc(b *testing.B) {
	b.ReportAllocs()
	c := NewPrivate().Counter("x")
	for b.Loop() {
		c.Inc()
	}
}
