// Package stats holds the proxy's counters in a shared memory region that
// the agent creates once (a memfd) and hands to every proxy generation. All
// generations add into the same counters, so totals survive hot restarts
// and crashes and a Prometheus rate() never sees a reset — the job Envoy's
// hot-restart channel does for its stats.
//
// The region is a small header (a note the agent writes for /server_info,
// e.g. the last reload failure) followed by fixed-size slots; a slot holds a
// counter's full Prometheus name (with labels) and its value. Slots are
// claimed with compare-and-swap, so generations running at the same time may
// register the same name concurrently.
//
// The region is the proxy's only home for counters: labelled families
// (CounterVec) are series of the same region, keyed by name and labels, so
// the L7 engine's per-route and per-cluster counters are as monotonic across
// generations as the L4 ones. Gauges and histograms describe one generation
// and stay in that generation's Prometheus registry.
package stats

import (
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

const (
	headerSize = 4096
	slotSize   = 256
	nameMax    = slotSize - 16
	// Slots is the number of counter series a region holds.
	Slots = 4096
	// Size is the byte size of a region.
	Size    = headerSize + Slots*slotSize
	noteMax = 2048
	magic   = 0x6d6573686c657432 // "meshlet2"

	offMagic   = 0
	offNoteSeq = 8
	offNoteLen = 16
	offDropped = 24
	offNote    = 64

	// DroppedName is the counter of series that found no slot (region full
	// or name longer than a slot holds); their increments are not exported.
	DroppedName = "meshlet_stats_dropped_series_total"

	slotFree     = 0
	slotClaiming = 1
	slotReady    = 2
)

// Region is a mapped counter region.
type Region struct {
	mem []byte
	mu  sync.Mutex
	// cache maps names to counters already looked up by this process.
	cache map[string]*Counter
	// index maps the names in the first scanned slots (all in use) to
	// their offsets.
	index   map[string]int
	scanned int
	// help maps family names to the HELP text this process registered.
	help map[string]string
}

// Counter is a monotonically increasing value in a Region.
type Counter struct {
	v atomic.Pointer[uint64]
	// vec and values name the series of a lazy counter (CounterVec.Lazy),
	// claimed at its first use.
	vec    *CounterVec
	values []string
}

func newCounter(v *uint64) *Counter {
	c := &Counter{}
	c.v.Store(v)
	return c
}

// value is the counter's word in the region, claimed now if c is lazy.
func (c *Counter) value() *uint64 {
	if v := c.v.Load(); v != nil {
		return v
	}
	v := c.vec.WithLabelValues(c.values...).value()
	c.v.Store(v)
	return v
}

// Add adds n.
func (c *Counter) Add(n uint64) { atomic.AddUint64(c.value(), n) }

// Inc adds one.
func (c *Counter) Inc() { atomic.AddUint64(c.value(), 1) }

// Value returns the current value.
func (c *Counter) Value() uint64 { return atomic.LoadUint64(c.value()) }

// Create makes a new region backed by a memfd, returning the region and the
// file to pass to child processes.
func Create() (*Region, *os.File, error) {
	fd, err := unix.MemfdCreate("meshlet-stats", 0)
	if err != nil {
		return nil, nil, fmt.Errorf("memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "meshlet-stats")
	if err := f.Truncate(Size); err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("sizing stats region: %w", err)
	}
	r, err := Open(f)
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	atomic.StoreUint64(r.u64(offMagic), magic)
	return r, f, nil
}

// Open maps the region in f (created by Create, possibly in another process).
func Open(f *os.File) (*Region, error) {
	mem, err := unix.Mmap(int(f.Fd()), 0, Size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mapping stats region: %w", err)
	}
	r := &Region{mem: mem, cache: map[string]*Counter{}, help: map[string]string{}, index: map[string]int{}}
	if m := atomic.LoadUint64(r.u64(offMagic)); m != 0 && m != magic {
		_ = unix.Munmap(mem)
		return nil, errors.New("stats region: bad magic")
	}
	atomic.StoreUint64(r.u64(offMagic), magic)
	return r, nil
}

// NewPrivate returns a region in private memory, for a proxy run alone.
func NewPrivate() *Region {
	mem, err := unix.Mmap(-1, 0, Size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		panic(fmt.Sprintf("mmap anonymous stats region: %v", err))
	}
	r := &Region{mem: mem, cache: map[string]*Counter{}, help: map[string]string{}, index: map[string]int{}}
	atomic.StoreUint64(r.u64(offMagic), magic)
	return r
}

func (r *Region) u64(off int) *uint64 { return (*uint64)(unsafe.Pointer(&r.mem[off])) }

func (r *Region) slot(i int) int { return headerSize + i*slotSize }

func (r *Region) name(off int) string {
	b := r.mem[off+16 : off+slotSize]
	if i := indexZero(b); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

func indexZero(b []byte) int {
	for i, c := range b {
		if c == 0 {
			return i
		}
	}
	return -1
}

// Counter returns the counter named name (a full Prometheus series name such
// as `meshlet_proxy_connections_total{direction="inbound"}`), creating it if
// needed. When the region is full, or the name is longer than a slot holds,
// it returns a counter in private memory (so callers never fail) and counts
// the series in meshlet_stats_dropped_series_total.
func (r *Region) Counter(name string) *Counter {
	r.mu.Lock()
	defer r.mu.Unlock()
	if c, ok := r.cache[name]; ok {
		return c
	}
	c := r.find(name)
	r.cache[name] = c
	return c
}

func (r *Region) find(name string) *Counter {
	if len(name) > nameMax {
		atomic.AddUint64(r.u64(offDropped), 1)
		return newCounter(new(uint64))
	}
	if off, ok := r.index[name]; ok {
		return newCounter(r.u64(off + 8))
	}
	// Slots are claimed in order and never freed, so the ones in use are a
	// prefix of the region: the part this process has read is indexed, the
	// scan goes on from its end (other generations may have claimed more).
	for r.scanned < Slots {
		off := r.slot(r.scanned)
		state := r.u64(off)
		switch atomic.LoadUint64(state) {
		case slotReady:
			n := r.name(off)
			if _, dup := r.index[n]; !dup { // the first slot of a name counts
				r.index[n] = off
			}
			r.scanned++
			if n == name {
				return newCounter(r.u64(off + 8))
			}
		case slotClaiming:
			runtime.Gosched()
		default:
			if atomic.CompareAndSwapUint64(state, slotFree, slotClaiming) {
				copy(r.mem[off+16:off+slotSize], name)
				atomic.StoreUint64(state, slotReady)
				r.index[name] = off
				r.scanned++
				return newCounter(r.u64(off + 8))
			}
		}
	}
	atomic.AddUint64(r.u64(offDropped), 1)
	return newCounter(new(uint64))
}

// Dropped returns how many series found no slot (see Counter).
func (r *Region) Dropped() uint64 { return atomic.LoadUint64(r.u64(offDropped)) }

// Each calls fn for every counter, sorted by family, then series name.
func (r *Region) Each(fn func(name string, value uint64)) {
	type kv struct {
		k string
		v uint64
	}
	var all []kv
	for i := 0; i < Slots; i++ {
		off := r.slot(i)
		if atomic.LoadUint64(r.u64(off)) != slotReady {
			continue
		}
		all = append(all, kv{r.name(off), atomic.LoadUint64(r.u64(off + 8))})
	}
	// By family, then series: a family's series stay together even when
	// another family's name extends it (a, a_b, a{x}).
	sort.Slice(all, func(i, j int) bool {
		bi, _, _ := strings.Cut(all[i].k, "{")
		bj, _, _ := strings.Cut(all[j].k, "{")
		if bi != bj {
			return bi < bj
		}
		return all[i].k < all[j].k
	})
	for _, e := range all {
		fn(e.k, e.v)
	}
}

// WritePrometheus writes every counter in the Prometheus text format, with
// the HELP text of the families this process registered.
func (r *Region) WritePrometheus(w io.Writer) error {
	r.mu.Lock()
	help := make(map[string]string, len(r.help))
	for k, v := range r.help {
		help[k] = v
	}
	r.mu.Unlock()
	var last string
	var err error
	r.Each(func(name string, v uint64) {
		if err != nil {
			return
		}
		base, _, _ := strings.Cut(name, "{")
		if base != last {
			if h, ok := help[base]; ok {
				_, err = fmt.Fprintf(w, "# HELP %s %s\n", base, escapeHelp(h))
			}
			if err == nil {
				_, err = fmt.Fprintf(w, "# TYPE %s counter\n", base)
			}
			last = base
		}
		if err == nil {
			_, err = fmt.Fprintf(w, "%s %d\n", name, v)
		}
	})
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "# HELP %s Counter series that found no slot in the shared stats region (full, or name too long); their counts are not exported.\n# TYPE %s counter\n%s %d\n",
		DroppedName, DroppedName, DroppedName, r.Dropped())
	return err
}

// SetNote stores a short message (at most 2 KiB) readable by every process
// mapping the region; the agent uses it for the last reload failure.
func (r *Region) SetNote(msg string) {
	if len(msg) > noteMax {
		msg = msg[:noteMax]
	}
	seq := r.u64(offNoteSeq)
	atomic.AddUint64(seq, 1) // odd: writing
	copy(r.mem[offNote:offNote+noteMax], msg)
	atomic.StoreUint64(r.u64(offNoteLen), uint64(len(msg)))
	atomic.AddUint64(seq, 1)
}

// Note returns the message stored by SetNote.
func (r *Region) Note() string {
	seq := r.u64(offNoteSeq)
	for i := 0; i < 100; i++ {
		s1 := atomic.LoadUint64(seq)
		if s1%2 == 1 {
			runtime.Gosched()
			continue
		}
		n := atomic.LoadUint64(r.u64(offNoteLen))
		if n > noteMax {
			n = noteMax
		}
		msg := string(r.mem[offNote : offNote+int(n)])
		if atomic.LoadUint64(seq) == s1 {
			return msg
		}
	}
	return ""
}
