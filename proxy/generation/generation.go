// Package generation runs one proxy generation (`meshlet proxy`): it takes
// what the agent passed down (listening sockets, shared counters, the
// configuration, the readiness pipe, the control socket and, when it
// replaces a running generation, the hand-over socket; see package
// proxy/agent), or binds its own listeners when run alone, serves until
// told to drain, and returns when the drain is complete.
package generation

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"github.com/meshlet/meshlet/internal/exepages"
	"github.com/meshlet/meshlet/internal/meshports"
	"github.com/meshlet/meshlet/proxy/agent"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/identity"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7"
	"github.com/meshlet/meshlet/proxy/server"
	"github.com/meshlet/meshlet/proxy/stats"
	"github.com/meshlet/meshlet/proxy/xds"
)

// Options configure a generation. NewOptions returns the defaults.
type Options struct {
	// ConfigPath is the configuration file when not started by the agent;
	// empty: the embedded default (pure L4 passthrough).
	ConfigPath string
	// Generation is this generation's number (set by the agent).
	Generation int
	// DrainDuration is the drain deadline.
	DrainDuration time.Duration
	// Listener addresses bound when not inherited from the agent; empty:
	// that listener is not served.
	OutboundAddr, InboundAddr, HealthAddr, PrometheusAddr, AdminAddr string
	// StaticDestination, if valid, is where connections that were not
	// redirected go instead of being rejected (testing without iptables).
	StaticDestination netip.AddrPort
	// Verbose starts with debug logging (SIGUSR2 toggles it).
	Verbose bool
	// Log receives the generation's logs (text); nil: os.Stderr.
	Log io.Writer
	// Version is reported in /server_info.
	Version string
	// XDS, when its address is set, configures the L7 engine from the
	// discovery server (package xds) on top of the configuration file.
	XDS xds.Settings
	// Identity receives the workload certificate and mesh roots the agent
	// hands over (agent.IdentityCommand), which the data path serves and
	// verifies mTLS with; nil: Run makes its own. Started by an agent that
	// runs the identity client (agent.EnvIdentity), the generation reports
	// ready only once the first identity arrived, and takes every renewal
	// without a restart.
	Identity *identity.Store
}

// NewOptions returns the defaults: generation 1, a 5s drain, the standard
// listener addresses.
func NewOptions() Options {
	return Options{
		Generation:     1,
		DrainDuration:  5 * time.Second,
		OutboundAddr:   meshports.Addr(meshports.Outbound),
		InboundAddr:    meshports.Addr(meshports.Inbound),
		HealthAddr:     meshports.Addr(meshports.Health),
		PrometheusAddr: meshports.Addr(meshports.Prometheus),
		AdminAddr:      meshports.LoopbackAddr(meshports.Admin),
	}
}

// Validate checks o, naming the option and value of each problem.
func (o Options) Validate() error {
	var errs []error
	if o.DrainDuration <= 0 {
		errs = append(errs, fmt.Errorf("drain duration: invalid value %s: must be positive", o.DrainDuration))
	}
	if o.Generation < 1 {
		errs = append(errs, fmt.Errorf("generation: invalid value %d: must be at least 1", o.Generation))
	}
	return errors.Join(errs...)
}

// ErrConfig marks a configuration the generation refused (reported to the
// agent as a failed start).
var ErrConfig = errors.New("proxy config")

// Run serves one generation until its drain is complete (or ctx ends, which
// drains it for a hot restart).
func Run(ctx context.Context, o Options) error {
	// Installed first: until then Go's default action for SIGUSR1/SIGUSR2
	// (exit) applies, and the agent forwards them only once ready.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(sigs)
	if o.Log == nil {
		o.Log = os.Stderr
	}
	level := &slog.LevelVar{}
	if o.Verbose {
		level.Set(slog.LevelDebug)
	}
	log := slog.New(slog.NewTextHandler(o.Log, &slog.HandlerOptions{Level: level})).With("generation", o.Generation)
	in, err := agent.Inherit(os.Getenv(agent.EnvInheritedFDs))
	if err != nil {
		return err
	}
	var ready, control *os.File
	var cfg *config.Loaded
	so := server.Options{Generation: o.Generation, DrainDuration: o.DrainDuration, Version: o.Version, Log: log}
	if err == nil {
		err = o.Validate()
	}
	if in != nil {
		ready, control = in.Ready, in.Control
		so.Listeners, so.Stats, so.Handover = in.Listeners, in.Stats, in.Handover
		if err == nil {
			cfg, err = config.Parse(in.Config)
			if err != nil {
				err = fmt.Errorf("%w: %w", ErrConfig, err)
			}
		}
	} else if err == nil {
		if o.ConfigPath != "" {
			cfg, err = config.LoadFile(o.ConfigPath)
		} else {
			cfg = config.Default()
		}
		if err != nil {
			err = fmt.Errorf("%w: %w", ErrConfig, err)
		} else {
			so.Listeners, err = bindAll(o)
		}
	}
	if err == nil && o.StaticDestination.IsValid() {
		dst := o.StaticDestination
		so.OrigDst = func(*net.TCPConn) (netip.AddrPort, error) { return dst, nil }
	}
	if err != nil {
		agent.ReportFailure(ready, err)
		return err
	}
	so.Config = cfg
	if so.Stats == nil {
		so.Stats = stats.NewPrivate()
	}
	ids := o.Identity
	if ids == nil {
		ids = &identity.Store{}
	}
	idUpdates := func(result string) *stats.Counter {
		return so.Stats.Counter(fmt.Sprintf("meshlet_proxy_identity_updates_total{result=%q}", result))
	}
	setIdentity := func(c agent.Command) {
		if err := ids.SetBundle(c.Payload); err != nil {
			idUpdates("failure").Inc()
			log.Error("workload identity refused; keeping the one in use", "identity", ids.Identity(), "err", err)
			return
		}
		idUpdates("success").Inc()
		leaf := ids.Certificate().Leaf
		log.Info("workload identity in use", "identity", ids.Identity(), "serial", leaf.SerialNumber.Text(16),
			"notAfter", leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	so.Certs = func() any { return ids.Dump(time.Now()) }
	commands := agent.Commands(control)
	if in != nil && os.Getenv(agent.EnvIdentity) == agent.IdentityFromAgent {
		o.XDS.Identity = ids // xDS over TLS presents it
		// The agent sends the identity right after the start; nothing
		// else comes before this generation reports ready.
		if err := awaitIdentity(ctx, commands, ids, setIdentity); err != nil {
			agent.ReportFailure(ready, err)
			return err
		}
	}
	var engine *l7.Engine
	var choose l4.Chooser
	if cfg.L7 != nil || o.XDS.Enabled() {
		base := config.L7{}
		if cfg.L7 != nil {
			base = *cfg.L7
		}
		engine, err = l7.New(base, l7.Options{Logger: log, Stats: so.Stats, Identity: ids})
		if err != nil {
			err = fmt.Errorf("%w: %w", ErrConfig, err)
			agent.ReportFailure(ready, err)
			return err
		}
		defer engine.Close()
		reg := prometheus.NewRegistry()
		for _, c := range engine.Collectors() {
			reg.MustRegister(c)
		}
		so.Gatherer = reg
		so.Chooser = func(c *l4.Conn) l4.Handler { return choose(c) }
		if o.XDS.Enabled() {
			xc, stop, err := xds.StartGeneration(log, o.XDS, base, engine, so.Stats, reg)
			if err != nil {
				agent.ReportFailure(ready, err)
				return err
			}
			defer stop()
			so.Dynamic = xc
		}
	}
	srv, err := server.New(so)
	if err != nil {
		agent.ReportFailure(ready, err)
		return err
	}
	if engine != nil {
		choose = engine.Chooser(srv.Forwarder())
	}
	srv.Start()
	agent.ReportReady(ready)
	if orig, ok := os.LookupEnv(agent.EnvStartGOGC); ok {
		// Started by the agent with the collector paused (see
		// agent.EnvStartGOGC): resume it now that the generation serves.
		if err := agent.RestoreGC(orig); err != nil {
			log.Warn("keeping the default GC target", "err", err)
			_ = agent.RestoreGC("")
		}
	}
	// Start-up ran every package initialiser of the one binary; unmap the
	// code and read-only data that touched (docs/design.md section 5).
	if n, err := exepages.Release(); err != nil {
		log.Warn("releasing start-up pages", "err", err)
	} else {
		log.Debug("released start-up pages", "bytes", n)
	}
	// The heap start-up left behind (the first xDS configuration's
	// responses and their decoding, several times the configuration it
	// built) goes back to the kernel now rather than over minutes by the
	// background scavenger: one collection.
	debug.FreeOSMemory()
	done := make(chan struct{})
	go func() { srv.Wait(); close(done) }()
	for {
		select {
		case <-ctx.Done():
			srv.Drain(server.HotRestart)
			ctx = context.Background() // fire once
		case c, ok := <-commands:
			switch {
			case !ok:
				commands = nil // the agent is gone; Pdeathsig ends us
			case c.Line == agent.IdentityCommand:
				setIdentity(c)
			case c.Line == agent.DrainShutdownCommand:
				closeFile(c.File)
				srv.Drain(server.Shutdown)
			case c.Line == agent.DrainHotRestartCommand && c.File != nil:
				hc, err := unixConn(c.File)
				if err != nil {
					log.Error("hand-over socket unusable; draining without it", "err", err)
					srv.Drain(server.HotRestart)
					continue
				}
				srv.HandOver(hc)
			default:
				closeFile(c.File)
				log.Warn("unknown control command ignored", "command", c.Line)
			}
		case s := <-sigs:
			name := unix.SignalName(s.(syscall.Signal))
			so.Stats.Counter(fmt.Sprintf("meshlet_proxy_signals_total{signal=%q}", name)).Inc()
			if s == syscall.SIGUSR2 {
				if level.Level() == slog.LevelDebug {
					level.Set(slog.LevelInfo)
				} else {
					level.Set(slog.LevelDebug)
				}
			}
			log.Info("signal received", "signal", name, "debug", level.Level() == slog.LevelDebug)
		case <-done:
			log.Info("generation exiting")
			return nil
		}
	}
}

// awaitIdentity reads the control socket until the first identity the
// agent sends was put in use.
func awaitIdentity(ctx context.Context, commands <-chan agent.Command, ids *identity.Store, set func(agent.Command)) error {
	for ids.Certificate() == nil {
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for the workload identity: %w", ctx.Err())
		case c, ok := <-commands:
			switch {
			case !ok:
				return errors.New("waiting for the workload identity: the agent closed the control socket")
			case c.Line == agent.IdentityCommand:
				set(c) // a refused bundle is logged; wait for the next
			default:
				closeFile(c.File)
				return fmt.Errorf("control command %q before the workload identity", c.Line)
			}
		}
	}
	return nil
}

func closeFile(f *os.File) {
	if f != nil {
		_ = f.Close()
	}
}

// unixConn turns f (closed in every case) into a *net.UnixConn.
func unixConn(f *os.File) (*net.UnixConn, error) {
	c, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	uc, ok := c.(*net.UnixConn)
	if !ok {
		c.Close()
		return nil, fmt.Errorf("descriptor is a %T, not a unix socket", c)
	}
	return uc, nil
}

func bindAll(o Options) (server.Listeners, error) {
	var ls server.Listeners
	var errs []error
	bind := func(name, addr string) *net.TCPListener {
		if addr == "" {
			return nil
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s listener %s: %w", name, addr, err))
			return nil
		}
		return ln.(*net.TCPListener)
	}
	if ln := bind("outbound", o.OutboundAddr); ln != nil {
		ls.Outbound = append(ls.Outbound, ln)
	}
	if ln := bind("inbound", o.InboundAddr); ln != nil {
		ls.Inbound = append(ls.Inbound, ln)
	}
	ls.Health = bind("health", o.HealthAddr)
	ls.Prometheus = bind("prometheus", o.PrometheusAddr)
	ls.Admin = bind("admin", o.AdminAddr)
	return ls, errors.Join(errs...)
}
