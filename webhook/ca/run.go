package ca

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	securityv1alpha1 "istio.io/api/security/v1alpha1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// DefaultAddr is the certificate API's listen address (Istio's port).
const DefaultAddr = ":15012"

// Options configure the control plane's CA: where its material lives, what
// it issues and where it serves. Zero values mean the documented defaults.
type Options struct {
	// Client talks to the API server. Required.
	Client kubernetes.Interface
	// Namespace is the control plane's namespace (CA Secrets). Required.
	Namespace string
	// TrustDomain of the identities issued. Empty means cluster.local.
	TrustDomain string
	// Audience a caller's token must be valid for. Empty means istio-ca.
	Audience string
	// WorkloadTTL is the default certificate lifetime. Zero means 24h.
	WorkloadTTL time.Duration
	// MaxWorkloadTTL caps a requested lifetime. Zero means 90 days.
	MaxWorkloadTTL time.Duration
	// RootValidity of a new self-signed root. Zero means 10 years.
	RootValidity time.Duration
	// ServingDNSNames of the certificate served on Addr. Empty means the
	// names of Service istiod in Namespace (istiod.<ns>.svc and the like).
	ServingDNSNames []string
	// Addr is the gRPC+TLS listen address. Empty means :15012.
	Addr string
	// Listener, when set, is used instead of listening on Addr (tests).
	Listener net.Listener
	// Registerer receives the CA's metrics. Nil means none are registered.
	Registerer prometheus.Registerer
	// Log receives what the CA does.
	Log logr.Logger
}

// Validate checks o and returns every problem found, each naming the option.
func (o Options) Validate() error {
	var errs []error
	if o.Client == nil {
		errs = append(errs, errors.New("ca: no API client"))
	}
	if o.Namespace == "" {
		errs = append(errs, errors.New("ca: namespace is empty"))
	}
	if o.TrustDomain != "" {
		if err := ValidateTrustDomain(o.TrustDomain); err != nil {
			errs = append(errs, fmt.Errorf("ca: --trust-domain: %w", err))
		}
	}
	if o.WorkloadTTL < 0 {
		errs = append(errs, fmt.Errorf("ca: --workload-cert-ttl %s is negative", o.WorkloadTTL))
	}
	if o.MaxWorkloadTTL < 0 {
		errs = append(errs, fmt.Errorf("ca: --max-workload-cert-ttl %s is negative", o.MaxWorkloadTTL))
	}
	if def, maxTTL := durOr(o.WorkloadTTL, DefaultWorkloadTTL), durOr(o.MaxWorkloadTTL, DefaultMaxWorkloadTTL); def > maxTTL {
		errs = append(errs, fmt.Errorf("ca: --workload-cert-ttl %s exceeds --max-workload-cert-ttl %s", def, maxTTL))
	}
	return errors.Join(errs...)
}

func durOr(d, def time.Duration) time.Duration {
	if d > 0 {
		return d
	}
	return def
}

// DNSNames returns the names a Service gets inside the cluster.
func DNSNames(service, namespace string) []string {
	return []string{
		service + "." + namespace + ".svc",
		service + "." + namespace + ".svc.cluster.local",
		service + "." + namespace,
		service,
	}
}

// CA is the running certificate authority: the signing material (reloaded
// when its Secrets change), the root publisher and the certificate server.
type CA struct {
	opts      Options
	store     StoreOptions
	server    *Server
	publisher *Publisher
	reloads   *prometheus.CounterVec
}

// New loads (or creates) the signing material and builds the CA's parts. Call
// Start to run them, or Run for everything including the listener.
func New(ctx context.Context, o Options) (*CA, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	o.TrustDomain = cmpOr(o.TrustDomain, DefaultTrustDomain)
	if len(o.ServingDNSNames) == 0 {
		o.ServingDNSNames = DNSNames("istiod", o.Namespace)
	}
	store := StoreOptions{Client: o.Client, Namespace: o.Namespace, TrustDomain: o.TrustDomain, RootValidity: o.RootValidity, Log: o.Log}
	a, err := Load(ctx, store)
	if err != nil {
		return nil, err
	}
	o.Log.Info("Mesh CA loaded", "source", a.Source(), "subject", a.Certificate().Subject.String(), "notAfter", a.Certificate().NotAfter.UTC().Format(time.RFC3339))
	srv, err := NewServer(a, ServerOptions{
		Authenticator:   &TokenReviewer{Client: o.Client, Audience: o.Audience, TrustDomain: o.TrustDomain},
		DefaultTTL:      o.WorkloadTTL,
		MaxTTL:          o.MaxWorkloadTTL,
		ServingDNSNames: o.ServingDNSNames,
		Log:             o.Log.WithName("certificates"),
	})
	if err != nil {
		return nil, err
	}
	pub, err := NewPublisher(PublisherOptions{Client: o.Client, Log: o.Log.WithName("root-publisher")}, a.RootPEM())
	if err != nil {
		return nil, err
	}
	c := &CA{opts: o, store: store, server: srv, publisher: pub,
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "meshlet_ca_reloads_total",
			Help: "Reloads of the CA's signing material after its Secrets changed, by result.",
		}, []string{"result"})}
	if o.Registerer != nil {
		for _, col := range append(srv.Collectors(), c.reloads) {
			if err := o.Registerer.Register(col); err != nil {
				return nil, fmt.Errorf("ca: registering metrics: %w", err)
			}
		}
	}
	return c, nil
}

// Server returns the certificate API implementation.
func (c *CA) Server() *Server { return c.server }

// Register adds the certificate API to a gRPC server (the control plane's
// TLS server on 15012 may carry xDS as well).
func (c *CA) Register(r grpc.ServiceRegistrar) {
	securityv1alpha1.RegisterIstioCertificateServiceServer(r, c.server)
}

// TLSConfig is the configuration of the 15012 listener: the serving
// certificate signed by the mesh CA, TLS 1.2 or newer, ALPN h2. A client
// certificate is asked for and, when one is given, verified against the
// mesh's current roots (those of the authority in use at the handshake):
// the certificate API's callers have none yet, xDS clients present their
// workload certificate (RequireWorkloadCertificate).
func (c *CA) TLSConfig() *tls.Config {
	base := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: c.server.ServingCertificate,
		NextProtos:     []string{"h2"},
		ClientAuth:     tls.VerifyClientCertIfGiven,
	}
	cfg := base.Clone()
	cfg.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		per := base.Clone()
		per.ClientCAs = x509.NewCertPool()
		for _, r := range c.server.Authority().Roots() {
			per.ClientCAs.AddCert(r)
		}
		return per, nil
	}
	return cfg
}

// RequireWorkloadCertificate is a gRPC stream interceptor for the 15012
// server: a stream (xDS) is refused with Unauthenticated unless the caller
// presented a certificate that verified against the mesh roots (TLSConfig).
// The certificate API is unary and stays open to callers without one.
func RequireWorkloadCertificate(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	p, ok := peer.FromContext(ss.Context())
	if ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.VerifiedChains) > 0 {
			return handler(srv, ss)
		}
	}
	return status.Errorf(codes.Unauthenticated, "%s on the TLS port needs a workload certificate issued by the mesh CA", info.FullMethod)
}

// Start runs the root publisher and the reloader until ctx ends.
func (c *CA) Start(ctx context.Context) error {
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return c.publisher.Run(ctx) })
	g.Go(func() error { return c.watchSecrets(ctx) })
	return g.Wait()
}

// watchSecrets reloads the signing material whenever cacerts or
// istio-ca-secret changes (a plug-in CA added, replaced or removed). Each
// Secret is watched by name (a field selector), so the RBAC can name them.
func (c *CA) watchSecrets(ctx context.Context) error {
	kick := make(chan struct{}, 1)
	onChange := func(any) {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	for _, name := range []string{PluginSecretName, SelfSignedSecretName} {
		f := informers.NewSharedInformerFactoryWithOptions(c.opts.Client, 10*time.Minute, informers.WithNamespace(c.opts.Namespace),
			informers.WithTweakListOptions(func(o *metav1.ListOptions) {
				o.FieldSelector = fields.OneTermEqualSelector("metadata.name", name).String()
			}))
		inf := f.Core().V1().Secrets().Informer()
		if _, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc: onChange, UpdateFunc: func(_, n any) { onChange(n) }, DeleteFunc: onChange,
		}); err != nil {
			return fmt.Errorf("watching secret %s/%s: %w", c.opts.Namespace, name, err)
		}
		f.Start(ctx.Done())
		defer f.Shutdown()
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-kick:
			c.reload(ctx)
		}
	}
}

func (c *CA) reload(ctx context.Context) {
	a, err := Load(ctx, c.store)
	if err != nil {
		if ctx.Err() == nil {
			c.reloads.WithLabelValues("failure").Inc()
			c.opts.Log.Error(err, "Reloading the mesh CA; keeping the one in use")
		}
		return
	}
	old := c.server.Authority()
	if old.Certificate().Equal(a.Certificate()) && bytes.Equal(old.RootPEM(), a.RootPEM()) {
		return
	}
	c.server.SetAuthority(a)
	c.publisher.SetRoot(a.RootPEM())
	c.reloads.WithLabelValues("success").Inc()
	c.opts.Log.Info("Mesh CA changed", "source", a.Source(), "subject", a.Certificate().Subject.String())
}

// Run loads the CA and serves the certificate API on Addr (gRPC over TLS)
// while publishing the root, until ctx ends. It is the whole CA for a process
// that has nothing else on 15012.
func Run(ctx context.Context, o Options) error {
	c, err := New(ctx, o)
	if err != nil {
		return err
	}
	ln := o.Listener
	if ln == nil {
		addr := cmpOr(o.Addr, DefaultAddr)
		ln, err = net.Listen("tcp", addr)
		if err != nil {
			return fmt.Errorf("ca: listening on %s: %w", addr, err)
		}
	}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(c.TLSConfig())))
	c.Register(gs)
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return c.Start(ctx) })
	g.Go(func() error {
		o.Log.Info("Serving the certificate API", "addr", ln.Addr().String())
		if err := gs.Serve(ln); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			return fmt.Errorf("ca: serving on %s: %w", ln.Addr(), err)
		}
		return nil
	})
	g.Go(func() error {
		<-ctx.Done()
		gs.GracefulStop()
		return nil
	})
	return g.Wait()
}
