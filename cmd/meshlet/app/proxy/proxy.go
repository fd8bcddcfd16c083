// Package proxy is the `meshlet proxy` command: one proxy generation. The
// agent starts it with inherited listening sockets (see package
// proxy/agent); run alone, it binds its own listeners from flags.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/cmd/meshlet/app/version"
	"github.com/meshlet/meshlet/proxy/agent"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7"
	"github.com/meshlet/meshlet/proxy/server"
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
and its configuration through file descriptors (` + agent.EnvInheritedFDs + `) and
reports readiness over a pipe. Run alone, it binds the addresses given by flags.
SIGTERM/SIGINT drain for a hot restart (stop accepting everywhere); SIGUSR1
drains for shutdown (stop accepting inbound, keep outbound until the deadline).`,
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
	log := cli.NewLogger(streams.Err, f.verbose).With("generation", f.generation)
	in, err := agent.Inherit(os.Getenv(agent.EnvInheritedFDs))
	if err != nil {
		return err
	}
	var ready *os.File
	var cfg *config.Loaded
	o := server.Options{Generation: f.generation, DrainDuration: f.drainDuration, Version: version.String(), Log: log}
	if in != nil {
		ready = in.Ready
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
	usr1 := make(chan os.Signal, 1)
	signal.Notify(usr1, syscall.SIGUSR1)
	defer signal.Stop(usr1)
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
	select {
	case <-ctx.Done():
		srv.Drain(server.HotRestart)
	case <-usr1:
		srv.Drain(server.Shutdown)
		go func() {
			<-ctx.Done()
			srv.Drain(server.HotRestart)
		}()
	}
	srv.Wait()
	log.Info("generation exiting")
	return nil
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
