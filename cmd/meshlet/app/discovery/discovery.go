// Package discovery holds `meshlet discovery`: the control plane that
// serves Kubernetes service discovery and Istio's traffic API to the
// sidecars (and proxyless gRPC clients) over xDS (webhook/discovery/server).
// Flags become checked server.Options; nothing below this package reads
// flags or the environment.
package discovery

import (
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/cobra"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/webhook/discovery/server"
	"github.com/meshlet/meshlet/webhook/discovery/translate"
)

// DefaultRootNamespace is Istio's root namespace (mesh-wide Sidecars,
// AuthorizationPolicies and PeerAuthentications).
const DefaultRootNamespace = translate.DefaultRootNamespace

type flagpole struct {
	xdsAddr, metricsAddr  string
	kubeconfig            string
	replica               string
	domain, rootNamespace string
	debounce, debounceMax time.Duration
	verbose               int
	ca                    caFlags
}

// env is what the command reads from its surroundings (tests replace it).
type env struct {
	getenv     func(string) string
	restConfig func(kubeconfig string) (*rest.Config, error)
}

func defaultEnv() env {
	return env{getenv: os.Getenv, restConfig: func(kubeconfig string) (*rest.Config, error) {
		if kubeconfig != "" {
			return clientcmd.BuildConfigFromFlags("", kubeconfig)
		}
		rules := clientcmd.NewDefaultClientConfigLoadingRules()
		return clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	}}
}

// New returns the `meshlet discovery` command.
func New(streams cli.Streams) *cobra.Command {
	cmd, _ := newCommand(streams, defaultEnv())
	return cmd
}

func newCommand(streams cli.Streams, e env) (*cobra.Command, *flagpole) {
	f := &flagpole{}
	cmd := &cobra.Command{
		Use:   "discovery",
		Short: "Run the control plane: Kubernetes services and Istio's traffic API as xDS",
		Long: `Watch Services, EndpointSlices, Pods, Namespaces and Istio's networking.istio.io/v1
VirtualService, DestinationRule, ServiceEntry and Sidecar, translate them into Envoy v3
listeners, routes, clusters and endpoints per proxy (docs/xds.md), and serve them over ADS
(state of the world and delta) to the sidecars and proxyless gRPC clients: in plain text on
--xds-addr (15010) and, with the mesh CA, over TLS on --ca-addr (15012) beside the
certificate API, to callers presenting a workload certificate. Resources that
cannot be translated get a Warning Event naming the field; the others keep being served.`,
		Example: `  meshlet discovery --xds-addr :15010 --metrics-addr :15014`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := logr.FromSlogHandler(cli.NewLogger(streams.Err, f.verbose > 0).Handler()).V(0)
			opts, err := f.options(e, log)
			if err != nil {
				return err
			}
			if opts.Registry == nil {
				opts.Registry = prometheus.NewRegistry() // shared with the CA
			}
			caOpts, caOn, err := f.ca.options(e.getenv, opts.Kube, opts.Registry, log)
			if err != nil {
				return err
			}
			return runWithCA(cmd.Context(), opts, caOpts, caOn)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.xdsAddr, "xds-addr", server.DefaultXDSAddr, "address of the plain-text ADS gRPC server (istiod's 15010; - disables it, leaving ADS over TLS on --ca-addr)")
	fl.StringVar(&f.metricsAddr, "metrics-addr", server.DefaultMetricsAddr, "address of /metrics, /healthz, /ready and /debug/syncz (- disables)")
	fl.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster, then $KUBECONFIG, then ~/.kube/config)")
	fl.StringVar(&f.replica, "replica", "", "this replica's name in proxy status (default: $POD_NAME, then the host name)")
	fl.StringVar(&f.domain, "domain", translate.DefaultDomain, "the cluster's DNS domain")
	fl.StringVar(&f.rootNamespace, "root-namespace", DefaultRootNamespace, "Istio's root namespace: its selector-less Sidecar and PeerAuthentication, and its AuthorizationPolicies, apply mesh-wide")
	fl.DurationVar(&f.debounce, "debounce", server.DefaultDebounce, "quiet time after a change before pushing (Istio's PILOT_DEBOUNCE_AFTER)")
	fl.DurationVar(&f.debounceMax, "debounce-max", server.DefaultDebounceMax, "push a continuous burst of changes at least this often (PILOT_DEBOUNCE_MAX)")
	fl.CountVarP(&f.verbose, "verbose", "v", "log every push (-v)")
	f.ca.register(fl)
	return cmd, f
}

// options checks the flags, naming each bad one, and builds server.Options.
func (f *flagpole) options(e env, log logr.Logger) (server.Options, error) {
	var errs []error
	bad := func(flag string, value any, problem string) {
		errs = append(errs, fmt.Errorf("--%s=%v: %s", flag, value, problem))
	}
	if f.xdsAddr == "-" && f.ca.addr == "-" {
		bad("xds-addr", f.xdsAddr, "with --ca-addr=- xDS would be served nowhere")
	} else if _, _, err := net.SplitHostPort(f.xdsAddr); err != nil && f.xdsAddr != "-" {
		bad("xds-addr", f.xdsAddr, "not host:port (or - to disable plain text)")
	}
	if f.metricsAddr != "-" {
		if _, _, err := net.SplitHostPort(f.metricsAddr); err != nil {
			bad("metrics-addr", f.metricsAddr, "not host:port (or - to disable)")
		}
	}
	if f.debounce <= 0 {
		bad("debounce", f.debounce, "must be positive")
	}
	if f.debounceMax < f.debounce {
		bad("debounce-max", f.debounceMax, fmt.Sprintf("must be at least --debounce=%v", f.debounce))
	}
	if f.domain == "" {
		bad("domain", `""`, "required")
	}
	if err := errors.Join(errs...); err != nil {
		return server.Options{}, err
	}
	replica := f.replica
	if replica == "" {
		replica = e.getenv("POD_NAME")
	}
	if replica == "" {
		replica, _ = os.Hostname()
	}
	cfg, err := e.restConfig(f.kubeconfig)
	if err != nil {
		return server.Options{}, fmt.Errorf("loading the Kubernetes client configuration: %w", err)
	}
	cfg.QPS, cfg.Burst = 50, 100
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return server.Options{}, fmt.Errorf("creating the Kubernetes client: %w", err)
	}
	istio, err := istioclient.NewForConfig(cfg)
	if err != nil {
		return server.Options{}, fmt.Errorf("creating the Istio client: %w", err)
	}
	if f.verbose > 0 {
		log = log.V(-f.verbose)
	}
	return server.Options{XDSAddr: f.xdsAddr, MetricsAddr: f.metricsAddr, Replica: replica, Domain: f.domain,
		RootNamespace: f.rootNamespace, TrustDomain: f.ca.trustDomain, Debounce: f.debounce, DebounceMax: f.debounceMax, Kube: kube, Istio: istio, Log: log}, nil
}
