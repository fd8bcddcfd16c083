package server

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/version"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/manager"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"

	"github.com/meshlet/meshlet/webhook/certs"
	"github.com/meshlet/meshlet/webhook/inject"
	"github.com/meshlet/meshlet/webhook/registration"
)

// CertMode says where the serving certificate comes from.
type CertMode string

// The certificate modes.
const (
	// CertModeSelf: the webhook issues, stores, publishes and rotates its own.
	CertModeSelf CertMode = "self"
	// CertModeCertManager: cert-manager issues it into a mounted Secret and
	// its cainjector publishes caBundle; the webhook only reads.
	CertModeCertManager CertMode = "cert-manager"
)

// Config is the validated configuration of a webhook server (built by the
// meshlet webhook command from its flags).
type Config struct {
	// RestConfig reaches the API server.
	RestConfig *rest.Config
	// Host and Port the HTTPS admission endpoint listens on; Path it serves.
	Host string
	Port int
	Path string
	// MetricsAddr serves /metrics; HealthAddr serves /healthz and /readyz.
	// "0" disables either.
	MetricsAddr string
	HealthAddr  string
	// Namespace the webhook runs in (never injected; holds the Secret).
	Namespace string
	// ServiceName is the Service in front of the webhook; the serving
	// certificate is issued for <service>.<namespace>.svc (and .cluster.local).
	ServiceName string
	// ExtraDNSNames and ExtraIPs are added to the serving certificate.
	ExtraDNSNames []string
	ExtraIPs      []net.IP
	// WebhookConfigNames are the MutatingWebhookConfigurations whose caBundle
	// the webhook owns (self mode) or checks (cert-manager mode).
	WebhookConfigNames []string
	// CertMode, and its settings: SecretName (self), CertDir (cert-manager).
	CertMode   CertMode
	SecretName string
	CertDir    string
	// CertValidity and CAValidity of self-issued certificates (zero: 1 year,
	// 10 years); CertInterval between certificate reconcile rounds (zero: 10 s).
	CertValidity time.Duration
	CAValidity   time.Duration
	CertInterval time.Duration
	// ConfigPath is the injection config document (empty: the embedded
	// defaults); ConfigPollInterval re-reads it (zero: 5 s).
	ConfigPath         string
	ConfigPollInterval time.Duration
	// NativeSidecar, if not empty or "auto", overrides the config's
	// nativeSidecar field.
	NativeSidecar inject.NativeSidecarMode
	// Log receives everything the server logs.
	Log logr.Logger
	// Started, if set, is called once every component is wired, before
	// serving (tests use it to reach the internals).
	Started func(*Server)
}

// Server is a running webhook's parts.
type Server struct {
	Handler  *Handler
	Config   *ConfigSource
	Certs    certs.Source
	Metrics  *Metrics
	Registry *prometheus.Registry
	Manager  manager.Manager
}

// DNSNames returns the serving certificate's DNS names for cfg; the first is
// the one the API server dials.
func (c Config) DNSNames() []string {
	svc := c.ServiceName + "." + c.Namespace
	return append([]string{svc + ".svc", svc + ".svc.cluster.local", svc, c.ServiceName}, c.ExtraDNSNames...)
}

// NewConfig returns the defaults every setting starts from (the meshlet
// webhook command's flags and the Helm chart use the same values): istiod's
// injection port 15017 and monitoring port 15014, self-issued
// certificates in the Secret meshlet-webhook-certs for the Service
// meshlet-webhook, reconciled every 10 s, the injection config re-read every
// 5 s. Namespace and RestConfig have no default.
func NewConfig() Config {
	return Config{
		Port:               15017,
		Path:               registration.DefaultPath,
		MetricsAddr:        ":15014",
		HealthAddr:         ":8080",
		ServiceName:        "meshlet-webhook",
		WebhookConfigNames: []string{registration.DefaultName},
		CertMode:           CertModeSelf,
		SecretName:         "meshlet-webhook-certs",
		CertDir:            "/etc/meshlet/webhook-certs",
		CertValidity:       certs.DefaultCertValidity,
		CAValidity:         certs.DefaultCAValidity,
		CertInterval:       10 * time.Second,
		ConfigPollInterval: 5 * time.Second,
	}
}

// Validate reports every problem of c at once, each naming the setting (as
// the command's flag and the chart spell it) and the bad value. Zero
// durations are the documented defaults and pass; RestConfig is checked by
// Run.
func (c Config) Validate() error {
	var errs []error
	bad := func(setting string, value any, problem string) {
		errs = append(errs, fmt.Errorf("%s: invalid value %v: %s", setting, value, problem))
	}
	if c.Port <= 0 || c.Port > 65535 {
		bad("port", c.Port, "not a TCP port")
	}
	if c.Path != "" && !strings.HasPrefix(c.Path, "/") {
		bad("path", strconv.Quote(c.Path), "must start with /")
	}
	if c.Namespace == "" {
		bad("namespace", `""`, "required (or set POD_NAMESPACE)")
	}
	if c.ServiceName == "" {
		bad("service-name", `""`, "required")
	}
	if len(c.WebhookConfigNames) == 0 {
		bad("webhook-config-name", `""`, "at least one MutatingWebhookConfiguration name is required")
	}
	switch c.CertMode {
	case CertModeSelf:
		if c.SecretName == "" {
			bad("secret-name", `""`, "required with cert-mode self")
		}
	case CertModeCertManager:
		if c.CertDir == "" {
			bad("cert-dir", `""`, "required with cert-mode cert-manager")
		}
	default:
		bad("cert-mode", strconv.Quote(string(c.CertMode)), "must be self or cert-manager")
	}
	switch c.NativeSidecar {
	case "", inject.NativeSidecarAuto, inject.NativeSidecarTrue, inject.NativeSidecarFalse:
	default:
		bad("native-sidecar", strconv.Quote(string(c.NativeSidecar)), "must be auto, true or false")
	}
	for _, d := range []struct {
		setting string
		v       time.Duration
	}{
		{"cert-validity", c.CertValidity}, {"ca-validity", c.CAValidity},
		{"cert-check-interval", c.CertInterval}, {"config-poll-interval", c.ConfigPollInterval},
	} {
		if d.v < 0 {
			bad(d.setting, d.v, "must be positive")
		}
	}
	cert, ca := cmp.Or(c.CertValidity, certs.DefaultCertValidity), cmp.Or(c.CAValidity, certs.DefaultCAValidity)
	if cert > ca {
		bad("cert-validity", cert, fmt.Sprintf("longer than ca-validity %v", ca))
	}
	return errors.Join(errs...)
}

// NativeSidecarSupported reports whether a server at gitVersion runs native
// sidecars (Kubernetes 1.29 and later).
func NativeSidecarSupported(gitVersion string) (bool, error) {
	v, err := version.ParseGeneric(gitVersion)
	if err != nil {
		return false, fmt.Errorf("parsing API server version %q: %w", gitVersion, err)
	}
	return v.AtLeast(version.MajorMinor(1, 29)), nil
}

// Run serves admission requests until ctx ends, then shuts down gracefully
// (in-flight requests finish, listeners close).
func Run(ctx context.Context, cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	if cfg.RestConfig == nil {
		return errors.New("no API server configuration")
	}
	log := cfg.Log
	path := cfg.Path
	if path == "" {
		path = "/inject"
	}
	clientset, err := kubernetes.NewForConfig(cfg.RestConfig)
	if err != nil {
		return fmt.Errorf("API client: %w", err)
	}
	sv, err := clientset.Discovery().ServerVersion()
	if err != nil {
		return fmt.Errorf("reading the API server version: %w", err)
	}
	native, err := NativeSidecarSupported(sv.GitVersion)
	if err != nil {
		log.Error(err, "Unknown API server version; nativeSidecar: auto means the classic layout")
	}
	log.Info("API server", "version", sv.GitVersion, "autoNativeSidecar", native)

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	m := NewMetrics(reg)

	configs, err := NewConfigSource(ConfigSourceOptions{
		Path: cfg.ConfigPath, PollInterval: cfg.ConfigPollInterval, Log: log.WithName("config"), Metrics: m,
		Adjust: func(c *inject.Config) {
			c.WebhookNamespace = cfg.Namespace
			if cfg.NativeSidecar != "" && cfg.NativeSidecar != inject.NativeSidecarAuto {
				c.NativeSidecar = cfg.NativeSidecar
			}
		},
	})
	if err != nil {
		return err
	}

	var src certs.Source
	dns := cfg.DNSNames()
	switch cfg.CertMode {
	case CertModeSelf:
		s, err := certs.NewSelfIssued(certs.SelfIssuedOptions{
			Client: clientset, Namespace: cfg.Namespace, SecretName: cfg.SecretName,
			WebhookConfigNames: cfg.WebhookConfigNames,
			Policy:             certs.Policy{DNSNames: dns, IPs: cfg.ExtraIPs, CertValidity: cfg.CertValidity, CAValidity: cfg.CAValidity},
			Interval:           cfg.CertInterval, Log: log.WithName("certs"),
		})
		if err != nil {
			return err
		}
		reg.MustRegister(s.Collectors()...)
		src = s
	case CertModeCertManager:
		f, err := certs.NewFiles(certs.FilesOptions{
			Dir: cfg.CertDir, Client: clientset, WebhookConfigNames: cfg.WebhookConfigNames, DNSName: dns[0], Log: log.WithName("certs"),
		})
		if err != nil {
			return err
		}
		src = f
	}

	scheme := runtime.NewScheme()
	if err := corev1.AddToScheme(scheme); err != nil {
		return err
	}
	nsMeta := &metav1.PartialObjectMetadata{}
	nsMeta.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Namespace"))
	shutdown := 20 * time.Second
	mgr, err := ctrl.NewManager(cfg.RestConfig, ctrl.Options{
		Scheme:                  scheme,
		Logger:                  log.WithName("manager"),
		Metrics:                 metricsserver.Options{BindAddress: "0"}, // served below from our registry
		HealthProbeBindAddress:  cfg.HealthAddr,
		GracefulShutdownTimeout: &shutdown,
		// Only namespace metadata is cached (labels decide injection).
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{nsMeta: {}}},
		WebhookServer: webhook.NewServer(webhook.Options{
			Host: cfg.Host, Port: cfg.Port,
			TLSOpts: []func(*tls.Config){func(t *tls.Config) {
				t.GetCertificate = src.GetCertificate
				t.MinVersion = tls.VersionTLS12
			}},
		}),
	})
	if err != nil {
		return fmt.Errorf("creating manager: %w", err)
	}
	nsInformer, err := mgr.GetCache().GetInformer(ctx, nsMeta)
	if err != nil {
		return fmt.Errorf("namespace informer: %w", err)
	}
	h := &Handler{
		Config:     configs.Current,
		Namespaces: &CachedNamespaces{Cache: mgr.GetClient(), Live: mgr.GetAPIReader()},
		Options:    inject.Options{RequireOptIn: true, AutoNativeSidecar: native},
		Metrics:    m,
		Log:        log.WithName("admission"),
	}
	mgr.GetWebhookServer().Register(path, h.Webhook())

	for _, r := range []manager.Runnable{src, configs} {
		if err := mgr.Add(r); err != nil {
			return err
		}
	}
	if cfg.MetricsAddr != "" && cfg.MetricsAddr != "0" {
		if err := mgr.Add(metricsRunnable(cfg.MetricsAddr, reg, log)); err != nil {
			return err
		}
	}
	if cfg.HealthAddr != "" && cfg.HealthAddr != "0" {
		if err := mgr.AddHealthzCheck("ping", func(*http.Request) error { return nil }); err != nil {
			return err
		}
		for _, c := range readinessChecks(mgr.GetWebhookServer().StartedChecker(), src.Ready, nsInformer) {
			if err := mgr.AddReadyzCheck(c.name, c.check); err != nil {
				return err
			}
		}
	}
	if cfg.Started != nil {
		cfg.Started(&Server{Handler: h, Config: configs, Certs: src, Metrics: m, Registry: reg, Manager: mgr})
	}
	log.Info("Serving admission webhook", "port", cfg.Port, "path", path, "certMode", string(cfg.CertMode),
		"metrics", cfg.MetricsAddr, "health", cfg.HealthAddr)
	if err := mgr.Start(ctx); err != nil {
		return fmt.Errorf("webhook server: %w", err)
	}
	return nil
}

// readinessCheck is one named /readyz check.
type readinessCheck struct {
	name  string
	check healthz.Checker
}

// readinessChecks are the webhook's /readyz checks. Each is a pure function
// of the state it names, so a ready replica stays ready until that state
// changes:
//   - webhook-server: the HTTPS admission listener accepts a TLS handshake;
//   - certificate-trusted: the serving certificate verifies against the
//     caBundle of every webhook configuration (certs.Source.Ready);
//   - namespace-cache: the namespace informer has listed every namespace once.
//     HasSynced stays true from then on (a relist after a dropped watch does
//     not clear it). Asking WaitForCacheSync with an already cancelled context
//     instead lets it pick at random between "synced" and "context done", which
//     failed about every other probe on a long synced cache.
func readinessChecks(server, certTrusted healthz.Checker, namespaces interface{ HasSynced() bool }) []readinessCheck {
	return []readinessCheck{
		{"webhook-server", server},
		{"certificate-trusted", certTrusted},
		{"namespace-cache", func(*http.Request) error {
			if !namespaces.HasSynced() {
				return errors.New("namespace cache has not listed the namespaces yet")
			}
			return nil
		}},
	}
}

// metricsRunnable serves reg on addr at /metrics until ctx ends.
func metricsRunnable(addr string, reg *prometheus.Registry, log logr.Logger) manager.RunnableFunc {
	return func(ctx context.Context) error {
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(prometheus.Gatherers{reg}, promhttp.HandlerOpts{}))
		srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("metrics listener on %s: %w", addr, err)
		}
		log.Info("Serving metrics", "addr", ln.Addr().String())
		go func() { //nolint:gosec // G118: shutting down starts once ctx is done, so it needs its own deadline
			<-ctx.Done()
			sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			_ = srv.Shutdown(sctx)
		}()
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return err
		}
		return nil
	}
}

// CachedNamespaces reads namespaces from the manager's cache, and from the
// API server directly when the cache does not know the namespace yet (it was
// created a moment ago).
type CachedNamespaces struct {
	Cache client.Reader
	Live  client.Reader
}

// Namespace returns name's labels and annotations.
func (c *CachedNamespaces) Namespace(ctx context.Context, name string) (inject.Namespace, error) {
	obj := &metav1.PartialObjectMetadata{}
	obj.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("Namespace"))
	err := c.Cache.Get(ctx, client.ObjectKey{Name: name}, obj)
	if err != nil && c.Live != nil {
		err = c.Live.Get(ctx, client.ObjectKey{Name: name}, obj)
	}
	if err != nil {
		return inject.Namespace{}, err
	}
	return inject.Namespace{Name: name, Labels: obj.Labels, Annotations: obj.Annotations}, nil
}

// StaticNamespaces is a fixed set of namespaces (tests, benchmarks, offline use).
type StaticNamespaces map[string]inject.Namespace

// Namespace returns the namespace name, or one without labels if unknown.
func (s StaticNamespaces) Namespace(_ context.Context, name string) (inject.Namespace, error) {
	if ns, ok := s[name]; ok {
		return ns, nil
	}
	return inject.Namespace{Name: name}, nil
}
