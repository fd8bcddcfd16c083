// Package filewatch calls a function once per burst of changes to a set of
// files or to matching entries of directories, the way Kubernetes volumes,
// editors and installers change them.
//
// Debounce policy: every change that counts (re)starts a quiet period
// (Options.Debounce, 100ms by default); the callback runs once the period
// passes without another change. Calls never overlap: a change seen while
// the callback runs gives one more call after it. Chmod-only events never
// count.
//
// What counts as a change of a watched file: an event on the file's path
// (a write in place, an editor's rename-over, delete and re-create); an
// event on "..data" in its directory (the atomic symlink swap of a ConfigMap
// or Secret volume, which the file is a symlink through); and an event on
// the directory itself, seen from its parent (the directory deleted and
// re-created, or, for a directory that is itself a symlink — a Secret item
// with a nested path — the symlink replaced). Directories are watched, never
// files, and every directory is watched again before each callback, so one
// deleted and re-created, or a symlink now pointing elsewhere, is followed.
package filewatch

import (
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/fsnotify/fsnotify"
)

// DefaultDebounce is the quiet period used when Options.Debounce is zero.
const DefaultDebounce = 100 * time.Millisecond

// Options configure New.
type Options struct {
	// Debounce is the quiet period after the last change before the
	// callback runs. Zero means DefaultDebounce.
	Debounce time.Duration
	// Logger receives watch errors. Nil discards them.
	Logger *slog.Logger
}

// Watcher watches files and directories and calls its callback once per
// burst of changes. Its methods may be called from any goroutine.
type Watcher struct {
	fs       *fsnotify.Watcher
	onChange func()
	debounce time.Duration
	log      *slog.Logger
	done     chan struct{}

	mu     sync.Mutex
	closed bool
	timer  *time.Timer
	// files are the watched file paths (cleaned, absolute or as given).
	files map[string]bool
	// fileDirs are the directories whose "..data" counts: those of the files.
	fileDirs map[string]bool
	// matchDirs are directories watched with WatchDir and their matchers.
	matchDirs map[string]func(name string) bool
	// watched are the directories added to fsnotify, each directory of
	// fileDirs and matchDirs and their parents.
	watched map[string]bool

	callMu sync.Mutex // serialises onChange
}

// New starts a watcher that calls onChange after each burst of changes. It
// watches nothing until SetFiles or WatchDir is called.
func New(onChange func(), o Options) (*Watcher, error) {
	fs, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("starting file watch: %w", err)
	}
	if o.Debounce <= 0 {
		o.Debounce = DefaultDebounce
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	w := &Watcher{
		fs: fs, onChange: onChange, debounce: o.Debounce, log: o.Logger, done: make(chan struct{}),
		files: map[string]bool{}, fileDirs: map[string]bool{},
		matchDirs: map[string]func(string) bool{}, watched: map[string]bool{},
	}
	go w.run()
	return w, nil
}

// SetFiles makes files the watched file set, replacing the previous one.
// Directories no longer needed are no longer watched. The error names each
// directory that cannot be watched (for example, it does not exist yet);
// the rest are watched all the same, and a directory that cannot be watched
// but whose parent can is picked up once it is created.
func (w *Watcher) SetFiles(files ...string) error {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.files = map[string]bool{}
	w.fileDirs = map[string]bool{}
	for _, f := range files {
		f = filepath.Clean(f)
		w.files[f] = true
		d := filepath.Dir(f)
		w.fileDirs[d] = true
		if fi, err := os.Lstat(d); err == nil && fi.Mode()&os.ModeSymlink != 0 {
			// dir/certs -> ..data/certs: the swap happens in dir.
			w.fileDirs[filepath.Dir(d)] = true
		}
	}
	return w.syncLocked()
}

// WatchDir adds dir: an event on an entry of dir whose base name match
// accepts counts as a change (match nil: every entry). The directory being
// deleted or re-created counts too.
func (w *Watcher) WatchDir(dir string, match func(name string) bool) error {
	if match == nil {
		match = func(string) bool { return true }
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.matchDirs[filepath.Clean(dir)] = match
	return w.syncLocked()
}

// Close stops the watch. No call of the callback starts after Close
// returns; one already running may still be finishing, so Close may be
// called while the callback is blocked.
func (w *Watcher) Close() error {
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return nil
	}
	w.closed = true
	if w.timer != nil {
		w.timer.Stop()
	}
	w.mu.Unlock()
	err := w.fs.Close()
	<-w.done
	return err
}

// syncLocked adds every directory needed (again: a re-created directory or
// a re-pointed symlink is followed) and removes those no longer needed.
func (w *Watcher) syncLocked() error {
	want := map[string]bool{}
	var dirs []string
	for d := range w.fileDirs {
		dirs = append(dirs, d)
	}
	for d := range w.matchDirs {
		dirs = append(dirs, d)
	}
	var errs []error
	for _, d := range dirs {
		want[d] = true
		if err := w.fs.Add(d); err != nil {
			errs = append(errs, fmt.Errorf("watching directory %s: %w", d, err))
		}
		if p := filepath.Dir(d); p != d && !want[p] {
			want[p] = true
			_ = w.fs.Add(p) // best effort: only for seeing d deleted or created
		}
	}
	for d := range w.watched {
		if !want[d] {
			_ = w.fs.Remove(d) // already gone if the directory was deleted
		}
	}
	w.watched = want
	return errors.Join(errs...)
}

// counts reports whether an event on name is a change.
func (w *Watcher) counts(name string) bool {
	name = filepath.Clean(name)
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.files[name] || w.fileDirs[name] {
		return true
	}
	if _, ok := w.matchDirs[name]; ok {
		return true
	}
	dir, base := filepath.Split(name)
	dir = filepath.Clean(dir)
	if base == "..data" && w.fileDirs[dir] {
		return true
	}
	if m, ok := w.matchDirs[dir]; ok && m(base) {
		return true
	}
	return false
}

// rewatch adds name again if it is a watched directory just created.
func (w *Watcher) rewatch(name string) {
	name = filepath.Clean(name)
	w.mu.Lock()
	defer w.mu.Unlock()
	_, m := w.matchDirs[name]
	if (m || w.fileDirs[name]) && !w.closed {
		_ = w.fs.Add(name)
	}
}

func (w *Watcher) run() {
	defer close(w.done)
	for {
		select {
		case ev, ok := <-w.fs.Events:
			if !ok {
				return
			}
			if ev.Op == fsnotify.Chmod || !w.counts(ev.Name) {
				continue
			}
			if ev.Has(fsnotify.Create) {
				w.rewatch(ev.Name)
			}
			w.mu.Lock()
			if !w.closed {
				if w.timer == nil {
					w.timer = time.AfterFunc(w.debounce, w.fire)
				} else {
					w.timer.Reset(w.debounce)
				}
			}
			w.mu.Unlock()
		case err, ok := <-w.fs.Errors:
			if !ok {
				return
			}
			w.log.Warn("file watch error", "err", err)
		}
	}
}

// fire runs the callback at the end of a quiet period.
func (w *Watcher) fire() {
	w.callMu.Lock()
	defer w.callMu.Unlock()
	w.mu.Lock()
	if w.closed {
		w.mu.Unlock()
		return
	}
	if err := w.syncLocked(); err != nil {
		w.log.Warn("file watch", "err", err)
	}
	w.mu.Unlock()
	w.onChange()
}
