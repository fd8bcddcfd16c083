// Package proxy is the `meshlet proxy` command: one proxy generation (see
// package proxy/generation). The agent starts it with inherited sockets
// (see package proxy/agent); run alone, it binds its own listeners from
// flags.
package proxy

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	"github.com/spf13/cobra"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/cmd/meshlet/app/version"
	"github.com/meshlet/meshlet/proxy/agent"
	"github.com/meshlet/meshlet/proxy/generation"
	"github.com/meshlet/meshlet/proxy/xds"
)

// flagpole holds the flags: the options themselves, and the flags that need
// converting.
type flagpole struct {
	opts        generation.Options
	staticDest  string
	xdsProtocol string
}

// New returns the `meshlet proxy` command.
func New(streams cli.Streams) *cobra.Command {
	f := &flagpole{opts: generation.NewOptions()}
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
	o, d := &f.opts, generation.NewOptions()
	fl.StringVar(&o.ConfigPath, "config", "", "proxy config file (YAML); default: the embedded pure-L4 config")
	fl.IntVar(&o.Generation, "generation", d.Generation, "generation number (set by the agent)")
	fl.DurationVar(&o.DrainDuration, "drain-duration", d.DrainDuration, "drain deadline")
	fl.StringVar(&o.OutboundAddr, "outbound-addr", d.OutboundAddr, "outbound capture listener when not inherited (empty: none)")
	fl.StringVar(&o.InboundAddr, "inbound-addr", d.InboundAddr, "inbound capture listener when not inherited (empty: none)")
	fl.StringVar(&o.HealthAddr, "health-addr", d.HealthAddr, "health listener when not inherited (empty: none)")
	fl.StringVar(&o.PrometheusAddr, "prometheus-addr", d.PrometheusAddr, "Prometheus listener when not inherited (empty: none)")
	fl.StringVar(&o.AdminAddr, "admin-addr", d.AdminAddr, "admin listener when not inherited (empty: none)")
	fl.StringVar(&f.staticDest, "static-destination", "", "testing: forward connections that were not redirected to this address instead of rejecting them")
	fl.BoolVarP(&o.Verbose, "verbose", "v", false, "debug logging")
	registerXDS(fl, &o.XDS, &f.xdsProtocol)
	return cmd
}

// run converts the flags into generation.Options and runs the generation;
// a refused configuration exits 2.
func run(ctx context.Context, streams cli.Streams, f *flagpole) error {
	o := f.opts
	o.Log, o.Version = streams.Err, version.String()
	if f.staticDest != "" {
		dst, err := netip.ParseAddrPort(f.staticDest)
		if err != nil {
			err = fmt.Errorf("--static-destination: invalid value %q: %w", f.staticDest, err)
			return &cli.ExitError{Code: 2, Err: err}
		}
		o.StaticDestination = dst
	}
	switch p := xds.Protocol(f.xdsProtocol); p {
	case xds.Auto, xds.Delta, xds.SotW:
		o.XDS.Protocol = p
	default:
		return &cli.ExitError{Code: 2, Err: fmt.Errorf("--xds-protocol: invalid value %q: must be delta or sotw (empty: delta, falling back to sotw)", f.xdsProtocol)}
	}
	switch o.XDS.TLS {
	case xds.TLSAuto, xds.TLSOn, xds.TLSOff:
	default:
		return &cli.ExitError{Code: 2, Err: fmt.Errorf("--xds-tls: invalid value %q: must be on or off (empty: on for port %s)", o.XDS.TLS, xds.DefaultTLSPort)}
	}
	err := generation.Run(ctx, o)
	if errors.Is(err, generation.ErrConfig) {
		return &cli.ExitError{Code: 2, Err: err}
	}
	return err
}
