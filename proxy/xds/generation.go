package xds

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"net"
	"os"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/identity"
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
	// TLS is TLSAuto (the default: TLS when Address's port is 15012,
	// the discovery server's TLS port), TLSOn or TLSOff. Over TLS the
	// client presents the workload certificate and verifies the server
	// against the mesh roots for ServerName.
	TLS TLSMode
	// ServerName the server's certificate must carry over TLS; empty:
	// Address's host (istiod.<ns>.svc).
	ServerName string
	// Identity holds the workload certificate and mesh roots used over TLS
	// (set by the generation when the agent hands it an identity); nil:
	// none, and TLS is refused.
	Identity *identity.Store
}

// TLSMode says whether the xDS connection uses TLS.
type TLSMode string

// TLS modes.
const (
	TLSAuto TLSMode = ""
	TLSOn   TLSMode = "on"
	TLSOff  TLSMode = "off"
)

// DefaultTLSPort is the discovery server's TLS port (istiod's 15012), on
// which TLSAuto turns TLS on.
const DefaultTLSPort = "15012"

// UseTLS reports whether the connection uses TLS, and the server name to
// verify; it fails on a mode it does not know or an address that is not
// host:port.
func (s Settings) UseTLS() (bool, string, error) {
	host, port, err := net.SplitHostPort(s.Address)
	if err != nil {
		return false, "", fmt.Errorf("xds: discovery address %q: %w", s.Address, err)
	}
	name := s.ServerName
	if name == "" {
		name = host
	}
	switch s.TLS {
	case TLSAuto:
		return port == DefaultTLSPort, name, nil
	case TLSOn:
		return true, name, nil
	case TLSOff:
		return false, name, nil
	}
	return false, "", fmt.Errorf("xds: TLS mode %q is not one of on, off (empty: on for port %s)", s.TLS, DefaultTLSPort)
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
	useTLS, serverName, err := s.UseTLS()
	if err != nil {
		return nil, nil, err
	}
	var tlsCfg *tls.Config
	if useTLS {
		if s.Identity == nil {
			return nil, nil, fmt.Errorf("xds: TLS to %s needs the workload identity (run the proxy under an agent with --ca-address), or --xds-tls=off", s.Address)
		}
		tlsCfg = s.Identity.ControlPlaneTLS(serverName)
	}
	log = log.With("component", "xds")
	c, err = New(Options{Address: s.Address, Node: id.Node(), Engine: EngineApplier(engine), Base: base,
		StateFile: s.StateFile, Protocol: s.Protocol, TLS: tlsCfg, Metrics: m, Log: log})
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
	log.Info("xDS client started", "address", s.Address, "tls", useTLS, "serverName", serverName, "node", id.NodeID(), "stateFile", s.StateFile)
	if s.InitialWait > 0 {
		if err := c.WaitReady(ctx, s.InitialWait); err != nil {
			log.Warn("serving without a complete configuration; not ready until it arrives", "err", err)
		}
	}
	return c, func() { cancel(); <-done }, nil
}
