// Package webhook holds `meshlet webhook`: the in-cluster admission webhook
// that injects the sidecar (webhook/server), with its certificates
// (webhook/certs). Flags become a checked server.Config; nothing below this
// package reads flags or the environment.
package webhook

import (
	"errors"
	"fmt"
	"net"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"github.com/spf13/cobra"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	ctrl "sigs.k8s.io/controller-runtime"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/webhook/certs"
	"github.com/meshlet/meshlet/webhook/inject"
	"github.com/meshlet/meshlet/webhook/registration"
	"github.com/meshlet/meshlet/webhook/server"
)

// Defaults of the flags (the Helm chart uses the same names).
const (
	// DefaultPort is istiod's injection port; the Service maps 443 to it.
	DefaultPort        = 15017
	DefaultSecretName  = "meshlet-webhook-certs"
	DefaultServiceName = "meshlet-webhook"
	DefaultCertDir     = "/etc/meshlet/webhook-certs"
	// DefaultMetricsAddr is istiod's monitoring port.
	DefaultMetricsAddr = ":15014"
	DefaultHealthAddr  = ":8080"
)

// flagpole holds the command's flags.
type flagpole struct {
	host, path         string
	port               int
	configPath         string
	configPoll         time.Duration
	certMode           string
	certDir            string
	secretName         string
	webhookConfigNames []string
	serviceName        string
	namespace          string
	extraDNSNames      []string
	extraIPs           []string
	metricsAddr        string
	healthAddr         string
	nativeSidecar      string
	certValidity       time.Duration
	caValidity         time.Duration
	certInterval       time.Duration
	kubeconfig         string
	verbose            bool
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
	f := &flagpole{}
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
	fl.IntVar(&f.port, "port", DefaultPort, "HTTPS port of the admission endpoint (the Service maps 443 to it)")
	fl.StringVar(&f.host, "host", "", "address to listen on (empty: all)")
	fl.StringVar(&f.path, "path", registration.DefaultPath, "URL path of the admission endpoint")
	fl.StringVar(&f.configPath, "config", "", "injection config document (the mounted ConfigMap), reloaded when it changes; empty: the embedded defaults")
	fl.DurationVar(&f.configPoll, "config-poll-interval", 5*time.Second, "re-read --config this often even without a file event")
	fl.StringVar(&f.certMode, "cert-mode", string(server.CertModeSelf), "where the serving certificate comes from: self (issue, store in --secret-name, publish caBundle, rotate) or cert-manager (read --cert-dir only)")
	fl.StringVar(&f.certDir, "cert-dir", DefaultCertDir, "cert-manager mode: directory holding tls.crt and tls.key")
	fl.StringVar(&f.secretName, "secret-name", DefaultSecretName, "self mode: Secret (in --namespace) holding the CA and serving certificate")
	fl.StringSliceVar(&f.webhookConfigNames, "webhook-config-name", []string{registration.DefaultName}, "MutatingWebhookConfiguration(s) whose caBundle the webhook owns (repeat or comma-separate)")
	fl.StringVar(&f.serviceName, "service-name", DefaultServiceName, "Service in front of the webhook; the certificate is issued for <service>.<namespace>.svc")
	fl.StringVar(&f.namespace, "namespace", "", "namespace the webhook runs in (default: $POD_NAMESPACE); never injected")
	fl.StringSliceVar(&f.extraDNSNames, "extra-dns-name", nil, "additional DNS name for the serving certificate (repeatable)")
	fl.StringSliceVar(&f.extraIPs, "extra-ip", nil, "additional IP address for the serving certificate (repeatable)")
	fl.StringVar(&f.metricsAddr, "metrics-addr", DefaultMetricsAddr, "address of the Prometheus /metrics endpoint (0 disables)")
	fl.StringVar(&f.healthAddr, "health-addr", DefaultHealthAddr, "address of /healthz and /readyz (0 disables)")
	fl.StringVar(&f.nativeSidecar, "native-sidecar", "", "override the config's nativeSidecar: auto (decide from the API server version, ≥ 1.29 → native), true or false; empty: keep the config's")
	fl.DurationVar(&f.certValidity, "cert-validity", certs.DefaultCertValidity, "self mode: lifetime of the serving certificate (renewed with a third left)")
	fl.DurationVar(&f.caValidity, "ca-validity", certs.DefaultCAValidity, "self mode: lifetime of the CA (rotated with a third left)")
	fl.DurationVar(&f.certInterval, "cert-check-interval", 10*time.Second, "self mode: how often the Secret and caBundle are reconciled")
	fl.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig file (default: in-cluster, then $KUBECONFIG, then ~/.kube/config)")
	fl.BoolVarP(&f.verbose, "verbose", "v", false, "log every admission decision")
	return cmd, f
}

// config checks the flags, naming each bad one, and builds server.Config.
func (f *flagpole) config(e env, log logr.Logger) (server.Config, error) {
	var errs []error
	bad := func(flag string, value any, problem string) {
		errs = append(errs, fmt.Errorf("--%s=%v: %s", flag, value, problem))
	}
	ns := f.namespace
	if ns == "" {
		ns = e.getenv("POD_NAMESPACE")
	}
	if ns == "" {
		bad("namespace", `""`, "required (or set POD_NAMESPACE)")
	}
	if f.port <= 0 || f.port > 65535 {
		bad("port", f.port, "not a TCP port")
	}
	if !strings.HasPrefix(f.path, "/") {
		bad("path", f.path, "must start with /")
	}
	mode := server.CertMode(f.certMode)
	switch mode {
	case server.CertModeSelf:
		if f.secretName == "" {
			bad("secret-name", `""`, "required with --cert-mode=self")
		}
	case server.CertModeCertManager:
		if f.certDir == "" {
			bad("cert-dir", `""`, "required with --cert-mode=cert-manager")
		}
	default:
		bad("cert-mode", f.certMode, "must be self or cert-manager")
	}
	names := nonEmpty(f.webhookConfigNames)
	if len(names) == 0 {
		bad("webhook-config-name", `""`, "at least one MutatingWebhookConfiguration name is required")
	}
	if f.serviceName == "" {
		bad("service-name", `""`, "required")
	}
	var ips []net.IP
	for _, s := range f.extraIPs {
		ip := net.ParseIP(s)
		if ip == nil {
			bad("extra-ip", s, "not an IP address")
			continue
		}
		ips = append(ips, ip)
	}
	native := inject.NativeSidecarMode(f.nativeSidecar)
	switch native {
	case "", inject.NativeSidecarAuto, inject.NativeSidecarTrue, inject.NativeSidecarFalse:
	default:
		bad("native-sidecar", f.nativeSidecar, "must be auto, true or false")
	}
	for flag, d := range map[string]time.Duration{"cert-validity": f.certValidity, "ca-validity": f.caValidity,
		"cert-check-interval": f.certInterval, "config-poll-interval": f.configPoll} {
		if d <= 0 {
			bad(flag, d, "must be positive")
		}
	}
	if f.certValidity > f.caValidity {
		bad("cert-validity", f.certValidity, fmt.Sprintf("longer than --ca-validity=%v", f.caValidity))
	}
	if err := errors.Join(errs...); err != nil {
		return server.Config{}, err
	}
	rc, err := e.restConfig(f.kubeconfig)
	if err != nil {
		return server.Config{}, fmt.Errorf("API server configuration (--kubeconfig=%q): %w", f.kubeconfig, err)
	}
	return server.Config{
		RestConfig: rc, Host: f.host, Port: f.port, Path: f.path,
		MetricsAddr: f.metricsAddr, HealthAddr: f.healthAddr,
		Namespace: ns, ServiceName: f.serviceName, ExtraDNSNames: nonEmpty(f.extraDNSNames), ExtraIPs: ips,
		WebhookConfigNames: names, CertMode: mode, SecretName: f.secretName, CertDir: f.certDir,
		CertValidity: f.certValidity, CAValidity: f.caValidity, CertInterval: f.certInterval,
		ConfigPath: f.configPath, ConfigPollInterval: f.configPoll, NativeSidecar: native,
		Log: log,
	}, nil
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
