package filewatch

import (
	"os"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"testing"
	"time"
)

// calls counts callbacks and signals each one.
type calls struct {
	n  atomic.Int64
	ch chan struct{}
}

func newWatcher(t *testing.T, debounce time.Duration) (*Watcher, *calls) {
	t.Helper()
	c := &calls{ch: make(chan struct{}, 100)}
	w, err := New(func() { c.n.Add(1); c.ch <- struct{}{} }, Options{Debounce: debounce})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = w.Close() })
	return w, c
}

// wait waits for the next callback.
func (c *calls) wait(t *testing.T, what string) {
	t.Helper()
	select {
	case <-c.ch:
	case <-time.After(10 * time.Second):
		t.Fatalf("no callback after %s", what)
	}
}

// none checks that no callback comes during a few quiet periods.
func (c *calls) none(t *testing.T, what string, debounce time.Duration) {
	t.Helper()
	select {
	case <-c.ch:
		t.Fatalf("unexpected callback after %s (total %d)", what, c.n.Load())
	case <-time.After(3 * debounce):
	}
}

func write(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestWriteInPlace(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "config.yaml")
	write(t, f, "a")
	w, c := newWatcher(t, 50*time.Millisecond)
	if err := w.SetFiles(f); err != nil {
		t.Fatal(err)
	}
	write(t, f, "b")
	c.wait(t, "a write in place")
	// Another file in the same directory is not watched.
	write(t, filepath.Join(dir, "other"), "x")
	c.none(t, "a write to an unwatched file", 50*time.Millisecond)
	// A chmod alone is no change.
	if err := os.Chmod(f, 0o600); err != nil {
		t.Fatal(err)
	}
	c.none(t, "a chmod", 50*time.Millisecond)
}

func TestRenameOver(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "config.yaml")
	write(t, f, "a")
	w, c := newWatcher(t, 50*time.Millisecond)
	if err := w.SetFiles(f); err != nil {
		t.Fatal(err)
	}
	tmp := filepath.Join(dir, ".config.yaml.swp")
	write(t, tmp, "b")
	if err := os.Rename(tmp, f); err != nil {
		t.Fatal(err)
	}
	c.wait(t, "an editor's rename-over")
	// The renamed-over file is still watched (the directory is).
	write(t, f, "c")
	c.wait(t, "a write after the rename-over")
}

// kubeletVolume lays out dir the way kubelet writes a ConfigMap or Secret
// volume: dir/..<ts>/<items>, dir/..data -> ..<ts>, and each top-level item
// a symlink through ..data. swap writes a new timestamped directory and
// swaps ..data onto it in one rename, then removes the old one.
type kubeletVolume struct {
	t   *testing.T
	dir string
	gen int
	cur string
	// keepOld leaves the previous timestamped directory in place, so only
	// the swap itself can be seen.
	keepOld bool
}

func (v *kubeletVolume) swap(items map[string]string, top ...string) {
	v.t.Helper()
	v.gen++
	ts := "..2026_12_03_00_00_0" + strconv.Itoa(v.gen)
	for name, data := range items {
		p := filepath.Join(v.dir, ts, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			v.t.Fatal(err)
		}
		write(v.t, p, data)
	}
	tmp := filepath.Join(v.dir, "..data_tmp")
	if err := os.Symlink(ts, tmp); err != nil {
		v.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(v.dir, "..data")); err != nil {
		v.t.Fatal(err)
	}
	for _, name := range top {
		link := filepath.Join(v.dir, name)
		if _, err := os.Lstat(link); err != nil {
			if err := os.Symlink(filepath.Join("..data", name), link); err != nil {
				v.t.Fatal(err)
			}
		}
	}
	if v.cur != "" && !v.keepOld {
		if err := os.RemoveAll(filepath.Join(v.dir, v.cur)); err != nil {
			v.t.Fatal(err)
		}
	}
	v.cur = ts
}

func TestDataSymlinkSwap(t *testing.T) {
	v := &kubeletVolume{t: t, dir: t.TempDir()}
	v.swap(map[string]string{"config.yaml": "a"}, "config.yaml")
	w, c := newWatcher(t, 50*time.Millisecond)
	if err := w.SetFiles(filepath.Join(v.dir, "config.yaml")); err != nil {
		t.Fatal(err)
	}
	v.swap(map[string]string{"config.yaml": "b"})
	c.wait(t, "a ..data symlink swap")
	v.swap(map[string]string{"config.yaml": "c"})
	c.wait(t, "a second ..data symlink swap")
}

// A Secret item with a nested path: dir/certs -> ..data/certs, the file
// dir/certs/tls.crt. The swap happens in dir, not in certs.
func TestDataSymlinkSwapNestedPath(t *testing.T) {
	v := &kubeletVolume{t: t, dir: t.TempDir()}
	v.swap(map[string]string{"certs/tls.crt": "a"}, "certs")
	w, c := newWatcher(t, 50*time.Millisecond)
	if err := w.SetFiles(filepath.Join(v.dir, "certs", "tls.crt")); err != nil {
		t.Fatal(err)
	}
	v.swap(map[string]string{"certs/tls.crt": "b"})
	c.wait(t, "a ..data swap under a nested path")
	// Without the old directory's removal (which the file's watch sees)
	// the swap itself must be seen.
	v.keepOld = true
	v.swap(map[string]string{"certs/tls.crt": "c"})
	c.wait(t, "a second ..data swap under a nested path")
}

// The quiet period is generous: on a loaded machine (the race detector,
// shared cores) a stall between two writes longer than the period would
// rightly split a burst in two.
func TestBurstIsOneCallback(t *testing.T) {
	const debounce = 500 * time.Millisecond
	dir := t.TempDir()
	f := filepath.Join(dir, "config.yaml")
	write(t, f, "a")
	w, c := newWatcher(t, debounce)
	if err := w.SetFiles(f); err != nil {
		t.Fatal(err)
	}
	for burst := range 2 {
		for i := range 50 {
			write(t, f, strconv.Itoa(burst*100+i))
		}
		c.wait(t, "a burst of writes")
		c.none(t, "the one callback of a burst", debounce)
		if got := c.n.Load(); got != int64(burst+1) {
			t.Fatalf("after %d bursts of 50 writes: %d callbacks, want %d", burst+1, got, burst+1)
		}
	}
}

func TestDirectoryDeletedAndRecreated(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "conf")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(dir, "config.yaml")
	write(t, f, "a")
	w, c := newWatcher(t, 50*time.Millisecond)
	if err := w.SetFiles(f); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	c.wait(t, "the directory deleted")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	write(t, f, "b")
	c.wait(t, "the directory re-created with the file")
	// The new directory is watched: a later write is seen.
	write(t, f, "c")
	c.wait(t, "a write in the re-created directory")
}

func TestDirectoryCreatedLater(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "conf")
	f := filepath.Join(dir, "config.yaml")
	w, c := newWatcher(t, 50*time.Millisecond)
	if err := w.SetFiles(f); err == nil {
		t.Fatal("SetFiles: no error for a directory that does not exist")
	}
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	c.wait(t, "the directory created")
	write(t, f, "a")
	c.wait(t, "the file written in the new directory")
}

func TestWatchDirMatch(t *testing.T) {
	dir := t.TempDir()
	w, c := newWatcher(t, 50*time.Millisecond)
	if err := w.WatchDir(dir, func(name string) bool { return filepath.Ext(name) == ".conflist" }); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(dir, "10-net.conf"), "x")
	c.none(t, "a file the matcher refuses", 50*time.Millisecond)
	write(t, filepath.Join(dir, "10-net.conflist"), "x")
	c.wait(t, "a matching file written")
	if err := os.Remove(filepath.Join(dir, "10-net.conflist")); err != nil {
		t.Fatal(err)
	}
	c.wait(t, "a matching file removed")
}

func TestSetFilesReplaces(t *testing.T) {
	a, b := t.TempDir(), t.TempDir()
	fa, fb := filepath.Join(a, "x"), filepath.Join(b, "y")
	w, c := newWatcher(t, 50*time.Millisecond)
	if err := w.SetFiles(fa); err != nil {
		t.Fatal(err)
	}
	if err := w.SetFiles(fb); err != nil {
		t.Fatal(err)
	}
	write(t, fa, "1")
	c.none(t, "a write to a file no longer watched", 50*time.Millisecond)
	write(t, fb, "1")
	c.wait(t, "a write to the new file")
}

func TestNoCallbackAfterClose(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "x")
	w, c := newWatcher(t, 50*time.Millisecond)
	if err := w.SetFiles(f); err != nil {
		t.Fatal(err)
	}
	write(t, f, "1")
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	c.none(t, "Close", 50*time.Millisecond)
}
