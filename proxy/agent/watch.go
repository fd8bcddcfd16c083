package agent

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/meshlet/meshlet/internal/filewatch"
	"github.com/meshlet/meshlet/proxy/config"
)

// watch starts watching the config file; watchFiles adds the files the
// config references (l7 TLS certificates and keys). Kubernetes ConfigMap and
// Secret volume updates, editors' rename-over and re-created directories are
// all seen (see internal/filewatch). The returned function stops the watch.
func (a *Agent) watch() (func(), error) {
	w, err := filewatch.New(func() { a.post(event{kind: evReload, reason: "watch"}) }, filewatch.Options{Logger: a.log})
	if err != nil {
		return nil, fmt.Errorf("watching %s: %w", a.o.ConfigPath, err)
	}
	if err := w.SetFiles(a.o.ConfigPath); err != nil {
		_ = w.Close()
		return nil, fmt.Errorf("watching %s: %w", a.o.ConfigPath, err)
	}
	a.watcher = w
	return func() { _ = a.watcher.Close() }, nil
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
	watched := []string{a.o.ConfigPath}
	for _, f := range files {
		if filepath.IsAbs(f) { // the config is refused for others
			watched = append(watched, f)
		}
	}
	if err := a.watcher.SetFiles(watched...); err != nil {
		// Retried at the next reload; until then changes there go unseen.
		a.log.Warn("cannot watch the directory of a file the config references", "err", err)
	}
}
