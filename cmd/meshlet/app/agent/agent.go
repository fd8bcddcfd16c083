// Package agent is the `meshlet agent` command: the sidecar supervisor, PID 1
// of the istio-proxy container (see package proxy/agent), and `meshlet agent
// wait`, the post-start hook that holds the application until the proxy is
// ready.
package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/cmd/meshlet/app/version"
	"github.com/meshlet/meshlet/internal/meshports"
	proxyagent "github.com/meshlet/meshlet/proxy/agent"
	"github.com/meshlet/meshlet/proxy/identity"
)

// envCAAddress is the environment variable --ca-address defaults from (the
// injector sets it on the sidecar).
const envCAAddress = "MESHLET_CA_ADDRESS"

// flagpole holds the flags: the agent's options themselves (defaults from
// proxyagent.NewOptions), and the flags that need converting.
type flagpole struct {
	opts             proxyagent.Options
	verbose          bool
	subreaper        bool
	captureListeners bool
}

// New returns the `meshlet agent` command.
func New(streams cli.Streams) *cobra.Command {
	f := &flagpole{opts: proxyagent.NewOptions()}
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the sidecar agent: owns the proxy listeners, supervises and hot-restarts proxy generations",
		Long: `Run the meshlet sidecar agent (PID 1 of istio-proxy). It binds the proxy
listeners once (15001, 15006, 15021, 15090, 127.0.0.1:15000), starts
` + "`meshlet proxy`" + ` generations that inherit them, and serves status on 15020:
/healthz/ready, /stats/prometheus, /server_info, POST /quitquitquit, POST /drain,
POST /reload. With --ca-address it obtains the workload certificate first
and hands it (and each renewal) to every generation. /server_info and the POST endpoints answer only callers inside the
pod (loopback source); others get 403 unless --allow-remote-lifecycle (which
opens the POST endpoints, never /server_info).

Hot restart (no connection lost) on a change of the --config file, SIGHUP or
POST /reload. Without --config the embedded default runs (pure L4 passthrough).

Signals (the agent is PID 1; generations run in their own process group, so a
terminal's Ctrl-C reaches only the agent):
  SIGTERM, SIGINT   drain and exit: fail readiness, stop accepting inbound, keep
                    outbound; exit when no connection is left or at
                    --drain-duration
  SIGHUP            hot restart (same as POST /reload)
  SIGUSR1, SIGUSR2  forwarded to every generation that has reported ready
                    (SIGUSR2 toggles its debug logging; SIGUSR1 is logged and
                    counted in meshlet_proxy_signals_total)
  SIGCHLD           reap children (and orphans: the agent is a subreaper)
  SIGQUIT           Go's default: dump goroutines and exit (generations die
                    with the agent)
  SIGKILL, SIGSTOP  cannot be caught; generations die with the agent`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return run(cmd.Context(), streams, f)
		},
	}
	fl := cmd.Flags()
	o, d := &f.opts, proxyagent.NewOptions()
	fl.StringVar(&o.ConfigPath, "config", "", "proxy config file, watched for changes (default: embedded pure-L4 config)")
	fl.DurationVar(&o.DrainDuration, "drain-duration", d.DrainDuration, "drain deadline for SIGTERM and for a replaced generation")
	fl.DurationVar(&o.StartTimeout, "start-timeout", d.StartTimeout, "how long a new generation may take to become ready")
	fl.StringVar(&o.OutboundAddr, "outbound-addr", d.OutboundAddr, "outbound capture listener")
	fl.StringVar(&o.InboundAddr, "inbound-addr", d.InboundAddr, "inbound capture listener")
	fl.BoolVar(&f.captureListeners, "capture-listeners", true, "bind the capture listeners (false: interception mode NONE, gateways)")
	fl.StringVar(&o.HealthAddr, "health-addr", d.HealthAddr, "proxy health listener")
	fl.StringVar(&o.PrometheusAddr, "prometheus-addr", d.PrometheusAddr, "proxy Prometheus listener")
	fl.StringVar(&o.AdminAddr, "admin-addr", d.AdminAddr, "proxy admin listener (keep it on loopback)")
	fl.StringVar(&o.StatusAddr, "status-addr", d.StatusAddr, "agent status listener")
	fl.StringVar(&o.AppMetricsURL, "app-metrics-url", "", "application metrics URL merged into /stats/prometheus")
	fl.BoolVar(&o.AllowRemoteLifecycle, "allow-remote-lifecycle", false, "serve POST /quitquitquit, /drain and /reload on the status listener to callers outside the pod (default: loopback sources only, others get 403)")
	fl.StringSliceVar(&o.ProxyArgs, "proxy-arg", nil, "extra argument for every `meshlet proxy` generation (repeatable)")
	fl.StringVar(&o.Executable, "proxy-executable", "", "binary started as `meshlet proxy` for each generation (default: this binary)")
	fl.StringVar(&o.CAAddress, "ca-address", os.Getenv(envCAAddress),
		"mesh CA host:port (env "+envCAAddress+", set by the injector); the proxy starts once it holds a workload certificate and every renewal reaches it without a restart; empty: no workload identity")
	fl.StringVar(&o.CAServerName, "ca-server-name", "", "name the CA's serving certificate must carry (default: the host of --ca-address)")
	fl.StringVar(&o.TokenFile, "ca-token-file", identity.DefaultTokenFile, "projected service-account token (audience istio-ca) sent to the CA")
	fl.StringVar(&o.RootCertFile, "mesh-root-cert-file", identity.DefaultRootCertFile, "the mesh's root certificates (ConfigMap istio-ca-root-cert)")
	fl.BoolVar(&f.subreaper, "subreaper", true, "become a child subreaper so orphaned processes are reaped")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "debug logging")
	cmd.AddCommand(newWait(streams))
	return cmd
}

func run(ctx context.Context, streams cli.Streams, f *flagpole) error {
	if f.opts.DrainDuration <= 0 {
		return &cli.ExitError{Code: 2, Err: fmt.Errorf("--drain-duration: invalid value %s: must be positive", f.opts.DrainDuration)}
	}
	if f.opts.StartTimeout <= 0 {
		return &cli.ExitError{Code: 2, Err: fmt.Errorf("--start-timeout: invalid value %s: must be positive", f.opts.StartTimeout)}
	}
	if err := f.opts.Validate(); err != nil {
		return &cli.ExitError{Code: 2, Err: err}
	}
	log := cli.NewLogger(streams.Err, f.verbose).With("component", "agent")
	if f.subreaper && os.Getpid() != 1 {
		if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
			log.Warn("cannot become child subreaper", "err", err)
		}
	}
	f.opts.Log = log
	f.opts.Version = version.String()
	f.opts.NoCaptureListeners = !f.captureListeners
	a, err := proxyagent.New(f.opts)
	if err != nil {
		return err
	}
	err = a.Run(ctx)
	if errors.Is(err, proxyagent.ErrQuit) {
		return nil
	}
	return err
}

type waitFlags struct {
	url      string
	timeout  time.Duration
	interval time.Duration
}

func newWait(streams cli.Streams) *cobra.Command {
	f := &waitFlags{}
	cmd := &cobra.Command{
		Use:   "wait",
		Short: "Wait until the sidecar is ready (post-start hook for holdApplicationUntilProxyStarts)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return wait(cmd.Context(), streams, f)
		},
	}
	cmd.Flags().StringVar(&f.url, "url", "http://"+meshports.LoopbackAddr(meshports.Status)+"/healthz/ready", "readiness URL")
	cmd.Flags().DurationVar(&f.timeout, "timeout", 60*time.Second, "give up after this long")
	cmd.Flags().DurationVar(&f.interval, "interval", 100*time.Millisecond, "poll interval")
	return cmd
}

func wait(ctx context.Context, streams cli.Streams, f *waitFlags) error {
	if f.timeout <= 0 || f.interval <= 0 {
		return fmt.Errorf("--timeout and --interval must be positive (got %s, %s)", f.timeout, f.interval)
	}
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	client := &http.Client{Timeout: time.Second}
	var last string
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, f.url, nil)
		if err != nil {
			return fmt.Errorf("--url: invalid value %q: %w", f.url, err)
		}
		resp, err := client.Do(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				fmt.Fprintln(streams.Out, "sidecar ready")
				return nil
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("sidecar not ready after %s (%s): %s", f.timeout, f.url, last)
		case <-time.After(f.interval):
		}
	}
}
