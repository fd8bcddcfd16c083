package server

import (
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"

	"github.com/meshlet/meshlet/internal/filewatch"
	"github.com/meshlet/meshlet/webhook/inject"
)

// ConfigSource holds the injection config in use and reloads it from a file
// (the mounted ConfigMap) when the file changes. A new document that does not
// load is rejected: it is logged, counted in
// meshlet_webhook_config_reloads_total{result="failure"}, and the last good
// config keeps serving.
type ConfigSource struct {
	path     string
	adjust   func(*inject.Config)
	interval time.Duration
	log      logr.Logger
	metrics  *Metrics

	cur     atomic.Pointer[inject.Config]
	mu      sync.Mutex
	lastRaw []byte
}

// ConfigSourceOptions configure NewConfigSource.
type ConfigSourceOptions struct {
	// Path of the injection config document. Empty: the embedded defaults,
	// never reloaded.
	Path string
	// Adjust, if set, is applied to every loaded config before it is used
	// (the command line's overrides).
	Adjust func(*inject.Config)
	// PollInterval re-reads the file even without a file-system event
	// (ConfigMap volumes update through symlink swaps). Zero means 5 seconds.
	PollInterval time.Duration
	Log          logr.Logger
	// Metrics to count reloads in (may be nil).
	Metrics *Metrics
}

// NewConfigSource loads the config once; an invalid initial document is an
// error (there is no last good config to fall back on).
func NewConfigSource(opts ConfigSourceOptions) (*ConfigSource, error) {
	s := &ConfigSource{path: opts.Path, adjust: opts.Adjust, interval: opts.PollInterval, log: opts.Log, metrics: opts.Metrics}
	if s.interval <= 0 {
		s.interval = 5 * time.Second
	}
	if s.path == "" {
		cfg := inject.DefaultConfig()
		if s.adjust != nil {
			s.adjust(&cfg)
		}
		if err := cfg.Validate(); err != nil {
			return nil, fmt.Errorf("injection config: %w", err)
		}
		s.cur.Store(&cfg)
		s.setValid(true)
		return s, nil
	}
	if _, err := s.reload(); err != nil {
		return nil, err
	}
	return s, nil
}

// Current returns the config in use. Callers must not modify it.
func (s *ConfigSource) Current() *inject.Config { return s.cur.Load() }

// Reload reads the file now. It reports whether a new config was applied; an
// error means the file was rejected and the previous config stays.
func (s *ConfigSource) Reload() (bool, error) {
	if s.path == "" {
		return false, nil
	}
	return s.reload()
}

func (s *ConfigSource) reload() (bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	raw, err := os.ReadFile(s.path)
	if err != nil {
		return false, s.reject(fmt.Errorf("reading injection config %s: %w", s.path, err))
	}
	if s.cur.Load() != nil && bytes.Equal(raw, s.lastRaw) {
		return false, nil
	}
	cfg, err := inject.LoadConfig(raw)
	if err == nil && s.adjust != nil {
		s.adjust(&cfg)
		err = cfg.Validate()
	}
	if err != nil {
		s.lastRaw = raw // do not log the same bad document every poll
		return false, s.reject(fmt.Errorf("injection config %s: %w", s.path, err))
	}
	s.lastRaw = raw
	s.cur.Store(&cfg)
	s.setValid(true)
	if s.metrics != nil {
		s.metrics.ConfigReloads.WithLabelValues("success").Inc()
	}
	s.log.Info("Injection config loaded", "path", s.path, "image", cfg.Image, "nativeSidecar", string(cfg.NativeSidecar))
	return true, nil
}

func (s *ConfigSource) reject(err error) error {
	if s.cur.Load() == nil {
		return err // initial load: the caller reports it
	}
	s.setValid(false)
	if s.metrics != nil {
		s.metrics.ConfigReloads.WithLabelValues("failure").Inc()
	}
	s.log.Error(err, "Rejected new injection config; the last good one keeps serving")
	return err
}

func (s *ConfigSource) setValid(ok bool) {
	if s.metrics == nil {
		return
	}
	if ok {
		s.metrics.ConfigValid.Set(1)
	} else {
		s.metrics.ConfigValid.Set(0)
	}
}

// Start watches the file until ctx ends: its changes (see
// internal/filewatch: writes, rename-over, ConfigMap "..data" swaps) plus a
// poll every PollInterval. It returns nil when ctx ends.
func (s *ConfigSource) Start(ctx context.Context) error {
	if s.path == "" {
		<-ctx.Done()
		return nil
	}
	reload := func() { _, _ = s.reload() } // errors are logged and counted by reload
	if w, err := filewatch.New(reload, filewatch.Options{Logger: slog.New(logr.ToSlogHandler(s.log))}); err != nil {
		s.log.Info("Watching the injection config failed; polling only", "error", err.Error())
	} else {
		defer w.Close()
		if err := w.SetFiles(s.path); err != nil {
			s.log.Info("Watching the injection config directory failed; polling until it appears", "error", err.Error())
		}
	}
	t := time.NewTicker(s.interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			reload()
		}
	}
}
