package agent

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/meshlet/meshlet/proxy/config"
)

// configWatcher posts a reload (reason "watch") when the config file or a
// file it references (l7 TLS certificates and keys) changes. Directories are
// watched, not files, so Kubernetes ConfigMap and Secret volume updates —
// an atomic swap of the directory's "..data" symlink, which the files are
// symlinks through — are seen as well as files written in place.
type configWatcher struct {
	w          *fsnotify.Watcher
	log        *slog.Logger
	configPath string

	mu sync.Mutex
	// names are the cleaned paths whose events count: the config file,
	// each referenced file, and "..data" in each watched directory.
	names map[string]bool
	// dirs are the directories watched besides the config file's.
	dirs map[string]bool
}

// watch starts watching the config file's directory; setFiles adds the
// directories of the files the config references. The returned function
// stops the watch.
func (a *Agent) watch() (func(), error) {
	w, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("watching %s: %w", a.o.ConfigPath, err)
	}
	if err := w.Add(a.configDir()); err != nil {
		w.Close()
		return nil, fmt.Errorf("watching %s: %w", a.configDir(), err)
	}
	cw := &configWatcher{w: w, log: a.log, configPath: filepath.Clean(a.o.ConfigPath), dirs: map[string]bool{}}
	_, cw.names = cw.watchedFor(nil)
	a.watcher = cw
	go cw.run(func() { a.post(event{kind: evReload, reason: "watch"}) })
	return func() { w.Close() }, nil
}

// watchedFor returns, for the referenced files, the directories to watch
// besides the config file's and the paths whose events count. A file's
// directory is watched, and its "..data" counts. When that directory is
// itself a symlink — a Secret item with a nested path, dir/certs ->
// ..data/certs — its parent is watched too, where the swap happens.
func (cw *configWatcher) watchedFor(files []string) (dirs, names map[string]bool) {
	configDir := filepath.Dir(cw.configPath)
	dirs = map[string]bool{}
	names = map[string]bool{
		cw.configPath:                      true,
		filepath.Join(configDir, "..data"): true,
	}
	watchDir := func(d string) {
		names[filepath.Join(d, "..data")] = true
		if d != configDir {
			dirs[d] = true
		}
	}
	for _, f := range files {
		names[f] = true
		d := filepath.Dir(f)
		watchDir(d)
		if fi, err := os.Lstat(d); err == nil && fi.Mode()&os.ModeSymlink != 0 { //nolint:gosec // G703: d is the directory of a file the config names; watching it is the point
			names[d] = true
			watchDir(filepath.Dir(d))
		}
	}
	return dirs, names
}

// setFiles makes the referenced files the watched set: their directories
// are added, directories no longer needed are removed, and from now on only
// events for these files (and the config file) count. Paths that are not
// absolute (the config is refused for them) are ignored. Directories
// already watched are added again: one deleted and re-created, or a symlink
// now pointing elsewhere, is watched afresh.
func (cw *configWatcher) setFiles(files []string) {
	var abs []string
	for _, f := range files {
		if filepath.IsAbs(f) {
			abs = append(abs, filepath.Clean(f))
		}
	}
	want, names := cw.watchedFor(abs)
	cw.mu.Lock()
	defer cw.mu.Unlock()
	for d := range cw.dirs {
		if !want[d] {
			_ = cw.w.Remove(d) // gone already if the directory was deleted
			delete(cw.dirs, d)
		}
	}
	for d := range want {
		if err := cw.w.Add(d); err != nil {
			// Retried at the next reload; until then changes there go unseen.
			cw.log.Warn("cannot watch the directory of a file the config references", "dir", d, "err", err)
			continue
		}
		cw.dirs[d] = true
	}
	cw.names = names
}

// counts reports whether an event for name should reload.
func (cw *configWatcher) counts(name string) bool {
	cw.mu.Lock()
	defer cw.mu.Unlock()
	return cw.names[filepath.Clean(name)]
}

// run turns the watcher's events into debounced reloads until it is closed.
func (cw *configWatcher) run(reload func()) {
	var debounce *time.Timer
	for {
		select {
		case ev, ok := <-cw.w.Events:
			if !ok {
				return
			}
			if ev.Op == fsnotify.Chmod || !cw.counts(ev.Name) {
				continue
			}
			// Debounce: editors, kubelet and cert-manager write in several
			// steps (and a certificate and its key one after the other).
			if debounce != nil {
				debounce.Stop()
			}
			debounce = time.AfterFunc(100*time.Millisecond, reload)
		case err, ok := <-cw.w.Errors:
			if !ok {
				return
			}
			cw.log.Warn("config watch error", "err", err)
		}
	}
}

// watchFiles points the watch at the files of the document just read: those
// of cfg, or, when the document was refused (cfg nil), those it names all
// the same — repairing a bad certificate file must reload it. It is called
// before the generation is started, so a change after the agent read the
// files is either seen by the generation or reported by the watch.
func (a *Agent) watchFiles(cfg *config.Loaded) {
	if a.watcher == nil {
		return
	}
	var files []string
	if cfg != nil {
		files = cfg.Files
	} else if b, err := os.ReadFile(a.o.ConfigPath); err == nil {
		files = config.ReferencedFiles(b)
	}
	a.watcher.setFiles(files)
}
