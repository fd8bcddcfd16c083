// Package webhook holds `meshlet webhook`: the in-cluster admission webhook
// that injects the sidecar (webhook/server), with its certificates
// (webhook/certs). Flags become a checked server.Config; nothing below this
// package reads flags or the environment.
package webhook

import (
	"cmp"
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/go-logr/logr"
	"github.com/spf13/cobra"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	ctrl "sigs.k8s.io/controller-runtime"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/webhook/inject"
	"github.com/meshlet/meshlet/webhook/server"
)

// flagpole holds the flags: the server's settings themselves (starting
// from server.NewConfig), and those that need converting.
type flagpole struct {
	cfg        server.Config
	certMode   string
	native     string
	extraIPs   []string
	kubeconfig string
	verbose    bool
}

// New returns the `meshlet webhook` command.
func New(streams cli.Streams) *cobra.Command {
	cmd, _ := newCommand(streams, defaultEnv())
	return cmd
}

// env is what the command reads from its surroundings (tests replace it).
type env struct {
	getenv     func(string) string
	restConfig func(kubeconfig string) (*rest.Config, error)
}

func defaultEnv() env {
	return env{
		getenv: getenv,
		restConfig: func(kubeconfig string) (*rest.Config, error) {
			if kubeconfig != "" {
				return clientcmd.BuildConfigFromFlags("", kubeconfig)
			}
			return ctrl.GetConfig()
		},
	}
}

func newCommand(streams cli.Streams, e env) (*cobra.Command, *flagpole) {
	f := &flagpole{cfg: server.NewConfig()}
	cmd := &cobra.Command{
		Use:   "webhook",
		Short: "Run the sidecar injection admission webhook",
		Long: `Serve the mutating admission webhook that injects the meshlet sidecar into pods
created in namespaces labelled istio-injection=enabled (or pods labelled
sidecar.istio.io/inject=true). By default the webhook issues its own CA and
serving certificate, keeps them in a Secret, writes caBundle into its
MutatingWebhookConfiguration(s) and rotates them before they expire; with
--cert-mode=cert-manager it only reads a certificate mounted at --cert-dir.`,
		Example: `  meshlet webhook --namespace meshlet-system --config /etc/meshlet/config/config.yaml`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log := logr.FromSlogHandler(cli.NewLogger(streams.Err, f.verbose).Handler())
			ctrllog.SetLogger(log)
			cfg, err := f.config(e, log)
			if err != nil {
				return err
			}
			return server.Run(cmd.Context(), cfg)
		},
	}
	fl := cmd.Flags()
	c, d := &f.cfg, server.NewConfig()
	fl.IntVar(&c.Port, "port", d.Port, "HTTPS port of the admission endpoint (the Service maps 443 to it)")
	fl.StringVar(&c.Host, "host", "", "address to listen on (empty: all)")
	fl.StringVar(&c.Path, "path", d.Path, "URL path of the admission endpoint")
	fl.StringVar(&c.ConfigPath, "config", "", "injection config document (the mounted ConfigMap), reloaded when it changes; empty: the embedded defaults")
	fl.DurationVar(&c.ConfigPollInterval, "config-poll-interval", d.ConfigPollInterval, "re-read --config this often even without a file event")
	fl.StringVar(&f.certMode, "cert-mode", string(d.CertMode), "where the serving certificate comes from: self (issue, store in --secret-name, publish caBundle, rotate) or cert-manager (read --cert-dir only)")
	fl.StringVar(&c.CertDir, "cert-dir", d.CertDir, "cert-manager mode: directory holding tls.crt and tls.key")
	fl.StringVar(&c.SecretName, "secret-name", d.SecretName, "self mode: Secret (in --namespace) holding the CA and serving certificate")
	fl.StringSliceVar(&c.WebhookConfigNames, "webhook-config-name", d.WebhookConfigNames, "MutatingWebhookConfiguration(s) whose caBundle the webhook owns (repeat or comma-separate)")
	fl.StringVar(&c.ServiceName, "service-name", d.ServiceName, "Service in front of the webhook; the certificate is issued for <service>.<namespace>.svc")
	fl.StringVar(&c.Namespace, "namespace", "", "namespace the webhook runs in (default: $POD_NAMESPACE); never injected")
	fl.StringSliceVar(&c.ExtraDNSNames, "extra-dns-name", nil, "additional DNS name for the serving certificate (repeatable)")
	fl.StringSliceVar(&f.extraIPs, "extra-ip", nil, "additional IP address for the serving certificate (repeatable)")
	fl.StringVar(&c.MetricsAddr, "metrics-addr", d.MetricsAddr, "address of the Prometheus /metrics endpoint (0 disables)")
	fl.StringVar(&c.HealthAddr, "health-addr", d.HealthAddr, "address of /healthz and /readyz (0 disables)")
	fl.StringVar(&f.native, "native-sidecar", "", "override the config's nativeSidecar: auto (decide from the API server version, ≥ 1.29 → native), true or false; empty: keep the config's")
	fl.DurationVar(&c.CertValidity, "cert-validity", d.CertValidity, "self mode: lifetime of the serving certificate (renewed with a third left)")
	fl.DurationVar(&c.CAValidity, "ca-validity", d.CAValidity, "self mode: lifetime of the CA (rotated with a third left)")
	fl.DurationVar(&c.CertInterval, "cert-check-interval", d.CertInterval, "self mode: how often the Secret and caBundle are reconciled")
	fl.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster, then $KUBECONFIG, then ~/.kube/config)")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "log every admission decision")
	return cmd, f
}

// config converts the flags into server.Config and validates it
// (server.Config.Validate names each bad setting as its flag is spelled),
// reporting every problem at once; only then does it read the API server
// configuration.
func (f *flagpole) config(e env, log logr.Logger) (server.Config, error) {
	cfg := f.cfg
	var errs []error
	cfg.Namespace = cmp.Or(cfg.Namespace, e.getenv("POD_NAMESPACE"))
	cfg.CertMode = server.CertMode(f.certMode)
	cfg.NativeSidecar = inject.NativeSidecarMode(f.native)
	cfg.WebhookConfigNames = nonEmpty(cfg.WebhookConfigNames)
	cfg.ExtraDNSNames = nonEmpty(cfg.ExtraDNSNames)
	cfg.ExtraIPs = nil
	for _, s := range f.extraIPs {
		ip := net.ParseIP(s)
		if ip == nil {
			errs = append(errs, fmt.Errorf("extra-ip: invalid value %s: not an IP address", s))
			continue
		}
		cfg.ExtraIPs = append(cfg.ExtraIPs, ip)
	}
	if err := errors.Join(append(errs, cfg.Validate())...); err != nil {
		return server.Config{}, &cli.ExitError{Code: 2, Err: err}
	}
	rc, err := e.restConfig(f.kubeconfig)
	if err != nil {
		return server.Config{}, fmt.Errorf("API server configuration (--kubeconfig=%q): %w", f.kubeconfig, err)
	}
	cfg.RestConfig, cfg.Log = rc, log
	return cfg, nil
}

func nonEmpty(in []string) []string {
	var out []string
	for _, s := range in {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}
