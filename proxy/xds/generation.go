package xds

import (
	"context"
	"log/slog"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/stats"
)

// Settings are a proxy generation's xDS settings (from its flags).
type Settings struct {
	// Address of the discovery server, host:port; empty: no xDS (the
	// static configuration only).
	Address string
	// StateFile keeps the last applied configuration (see
	// Options.StateFile); empty: not kept.
	StateFile string
	// Protocol: delta, sotw or empty (delta, falling back to sotw).
	Protocol Protocol
	// InitialWait bounds how long the generation waits for a first
	// complete configuration before it serves (not ready) anyway.
	InitialWait time.Duration
}

// Enabled reports whether the generation uses xDS.
func (s Settings) Enabled() bool { return s.Address != "" }

// StartGeneration runs the xDS client of a proxy generation: its node
// identity from the sidecar's environment (IdentityFromEnv), the engine
// configured from base plus the xDS resources, its counters in region and
// its other metrics registered in reg. It serves the persisted configuration if there is one, subscribes,
// and waits up to s.InitialWait for a complete configuration. stop ends
// the client and returns once its last state is persisted.
func StartGeneration(log *slog.Logger, s Settings, base config.L7, engine Engine, region *stats.Region, reg prometheus.Registerer) (c *Client, stop func(), err error) {
	id, err := IdentityFromEnv(os.Getenv, os.Environ())
	if err != nil {
		return nil, nil, err
	}
	m := NewMetrics(region)
	for _, col := range m.Collectors() {
		if err := reg.Register(col); err != nil {
			return nil, nil, err
		}
	}
	log = log.With("component", "xds")
	c, err = New(Options{Address: s.Address, Node: id.Node(), Engine: EngineApplier(engine), Base: base,
		StateFile: s.StateFile, Protocol: s.Protocol, Metrics: m, Log: log})
	if err != nil {
		return nil, nil, err
	}
	if _, err := c.LoadPersisted(); err != nil {
		// Not fatal: the control plane sends everything again.
		log.Error("ignoring the persisted xDS configuration", "err", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { defer close(done); _ = c.Run(ctx) }()
	log.Info("xDS client started", "address", s.Address, "node", id.NodeID(), "stateFile", s.StateFile)
	if s.InitialWait > 0 {
		if err := c.WaitReady(ctx, s.InitialWait); err != nil {
			log.Warn("serving without a complete configuration; not ready until it arrives", "err", err)
		}
	}
	return c, func() { cancel(); <-done }, nil
}
