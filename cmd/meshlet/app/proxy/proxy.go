// Package proxy is the `meshlet proxy` command: one proxy generation. The
// agent starts it with inherited listening sockets (see package
// proxy/agent); run alone, it binds its own listeners from flags.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/cmd/meshlet/app/version"
	"github.com/meshlet/meshlet/proxy/agent"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7"
	"github.com/meshlet/meshlet/proxy/server"
	"github.com/meshlet/meshlet/proxy/stats"
)

type flagpole struct {
	configPath     string
	generation     int
	drainDuration  time.Duration
	outboundAddr   string
	inboundAddr    string
	healthAddr     string
	prometheusAddr string
	adminAddr      string
	staticDest     string
	verbose        bool
}

// New returns the `meshlet proxy` command.
func New(streams cli.Streams) *cobra.Command {
	f := &flagpole{}
	cmd := &cobra.Command{
		Use:   "proxy",
		Short: "Run one proxy generation (normally started by `meshlet agent`)",
		Long: `Run one generation of the meshlet proxy: transparent L4 passthrough on the
outbound (15001) and inbound (15006) capture listeners, health on 15021,
Prometheus on 15090 and admin on 127.0.0.1:15000.

Started by the agent, it inherits the listening sockets, the shared counters
and its configuration through file descriptors (` + agent.EnvInheritedFDs + `),
reports readiness over a pipe and takes the shutdown drain (stop accepting
inbound, keep outbound until the deadline) over a control pipe. Run alone, it
binds the addresses given by flags.

Signals:
  SIGTERM, SIGINT  drain for a hot restart (stop accepting everywhere), exit
  SIGUSR1          logged and counted (meshlet_proxy_signals_total); no action
  SIGUSR2          toggle debug logging
The agent forwards SIGUSR1 and SIGUSR2 it receives to its generations.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return run(cmd.Context(), streams, f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.configPath, "config", "", "proxy config file (YAML); default: the embedded pure-L4 config")
	fl.IntVar(&f.generation, "generation", 1, "generation number (set by the agent)")
	fl.DurationVar(&f.drainDuration, "drain-duration", 5*time.Second, "drain deadline")
	fl.StringVar(&f.outboundAddr, "outbound-addr", ":15001", "outbound capture listener when not inherited (empty: none)")
	fl.StringVar(&f.inboundAddr, "inbound-addr", ":15006", "inbound capture listener when not inherited (empty: none)")
	fl.StringVar(&f.healthAddr, "health-addr", ":15021", "health listener when not inherited (empty: none)")
	fl.StringVar(&f.prometheusAddr, "prometheus-addr", ":15090", "Prometheus listener when not inherited (empty: none)")
	fl.StringVar(&f.adminAddr, "admin-addr", "127.0.0.1:15000", "admin listener when not inherited (empty: none)")
	fl.StringVar(&f.staticDest, "static-destination", "", "testing: forward connections that were not redirected to this address instead of rejecting them")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "debug logging")
	return cmd
}

func run(ctx context.Context, streams cli.Streams, f *flagpole) error {
	// Installed first: until then Go's default action for SIGUSR1/SIGUSR2
	// (exit) applies, and the agent forwards them only once ready.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGUSR2)
	defer signal.Stop(sigs)
	level := &slog.LevelVar{}
	if f.verbose {
		level.Set(slog.LevelDebug)
	}
	log := slog.New(slog.NewTextHandler(streams.Err, &slog.HandlerOptions{Level: level})).With("generation", f.generation)
	in, err := agent.Inherit(os.Getenv(agent.EnvInheritedFDs))
	if err != nil {
		return err
	}
	var ready, control *os.File
	var cfg *config.Loaded
	o := server.Options{Generation: f.generation, DrainDuration: f.drainDuration, Version: version.String(), Log: log}
	if in != nil {
		ready, control = in.Ready, in.Control
		o.Listeners, o.Stats = in.Listeners, in.Stats
		cfg, err = config.Parse(in.Config)
		if err != nil {
			err = fmt.Errorf("proxy config: %w", err)
		}
	} else {
		if f.configPath != "" {
			cfg, err = config.LoadFile(f.configPath)
		} else {
			cfg = config.Default()
		}
		if err == nil {
			o.Listeners, err = bindAll(f)
		}
	}
	if err == nil && f.staticDest != "" {
		var dst netip.AddrPort
		dst, err = netip.ParseAddrPort(f.staticDest)
		if err != nil {
			err = fmt.Errorf("--static-destination: invalid value %q: %w", f.staticDest, err)
		}
		o.OrigDst = func(*net.TCPConn) (netip.AddrPort, error) { return dst, nil }
	}
	if err != nil {
		agent.ReportFailure(ready, err)
		return &cli.ExitError{Code: 2, Err: err}
	}
	o.Config = cfg
	if o.Stats == nil {
		o.Stats = stats.NewPrivate()
	}
	var engine *l7.Proxy
	var choose l4.Chooser
	if cfg.L7 != nil {
		engine, err = l7.New(*cfg.L7, l7.Options{Logger: log})
		if err != nil {
			agent.ReportFailure(ready, err)
			return &cli.ExitError{Code: 2, Err: fmt.Errorf("proxy config: %w", err)}
		}
		defer engine.Close()
		reg := prometheus.NewRegistry()
		for _, c := range engine.Collectors() {
			reg.MustRegister(c)
		}
		o.Gatherer = reg
		o.Chooser = func(c *l4.Conn) l4.Handler { return choose(c) }
	}
	srv, err := server.New(o)
	if err != nil {
		agent.ReportFailure(ready, err)
		return err
	}
	if engine != nil {
		choose = engine.Chooser(srv.Forwarder())
	}
	commands := agent.Commands(control)
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
			case c == agent.DrainShutdownCommand:
				srv.Drain(server.Shutdown)
			default:
				log.Warn("unknown control command ignored", "command", c)
			}
		case s := <-sigs:
			name := unix.SignalName(s.(syscall.Signal))
			o.Stats.Counter(fmt.Sprintf("meshlet_proxy_signals_total{signal=%q}", name)).Inc()
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

func bindAll(f *flagpole) (server.Listeners, error) {
	var ls server.Listeners
	var errs []error
	bind := func(flag, addr string) *net.TCPListener {
		if addr == "" {
			return nil
		}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			errs = append(errs, fmt.Errorf("--%s %s: %w", flag, addr, err))
			return nil
		}
		return ln.(*net.TCPListener)
	}
	if ln := bind("outbound-addr", f.outboundAddr); ln != nil {
		ls.Outbound = append(ls.Outbound, ln)
	}
	if ln := bind("inbound-addr", f.inboundAddr); ln != nil {
		ls.Inbound = append(ls.Inbound, ln)
	}
	ls.Health = bind("health-addr", f.healthAddr)
	ls.Prometheus = bind("prometheus-addr", f.prometheusAddr)
	ls.Admin = bind("admin-addr", f.adminAddr)
	return ls, errors.Join(errs...)
}
