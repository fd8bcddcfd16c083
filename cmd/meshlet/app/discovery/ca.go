package discovery

import (
	"context"
	"errors"
	"fmt"
	"net"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spf13/pflag"
	"golang.org/x/sync/errgroup"
	"k8s.io/client-go/kubernetes"

	"github.com/meshlet/meshlet/webhook/ca"
	"github.com/meshlet/meshlet/webhook/discovery/server"
)

// caFlags are the flags of the mesh CA and its certificate API, which run in
// the discovery process (webhook/ca).
type caFlags struct {
	addr, namespace, service string
	trustDomain              string
	ttl, maxTTL              time.Duration
}

func (c *caFlags) register(fl *pflag.FlagSet) {
	fl.StringVar(&c.addr, "ca-addr", ca.DefaultAddr, "address of the certificate API and of ADS over TLS, one gRPC server (istiod's 15012; - disables the CA and the TLS port)")
	fl.StringVar(&c.namespace, "ca-namespace", "", "namespace of the CA Secrets cacerts and istio-ca-secret (default: $POD_NAMESPACE)")
	fl.StringVar(&c.service, "ca-service", "istiod", "Service whose names (service.namespace.svc …) the certificate API's serving certificate carries")
	fl.StringVar(&c.trustDomain, "trust-domain", ca.DefaultTrustDomain, "trust domain of the SPIFFE IDs issued")
	fl.DurationVar(&c.ttl, "workload-cert-ttl", ca.DefaultWorkloadTTL, "lifetime of a workload certificate whose request asks for none")
	fl.DurationVar(&c.maxTTL, "max-workload-cert-ttl", ca.DefaultMaxWorkloadTTL, "longest workload certificate issued (longer requests are clamped)")
}

// options checks the CA flags, naming each bad one; enabled is false for
// --ca-addr=-.
func (c *caFlags) options(getenv func(string) string, kube kubernetes.Interface, reg prometheus.Registerer, log logr.Logger) (o ca.Options, enabled bool, err error) {
	if c.addr == "-" {
		return ca.Options{}, false, nil
	}
	var errs []error
	if _, _, err := net.SplitHostPort(c.addr); err != nil {
		errs = append(errs, fmt.Errorf("--ca-addr=%s: not host:port (or - to disable)", c.addr))
	}
	ns := c.namespace
	if ns == "" {
		ns = getenv("POD_NAMESPACE")
	}
	if ns == "" {
		errs = append(errs, fmt.Errorf("--ca-namespace=\"\": required (or $POD_NAMESPACE) unless --ca-addr=-"))
	}
	if c.service == "" {
		errs = append(errs, fmt.Errorf("--ca-service=\"\": required"))
	}
	if c.ttl <= 0 {
		errs = append(errs, fmt.Errorf("--workload-cert-ttl=%s: must be positive", c.ttl))
	}
	if c.maxTTL < c.ttl {
		errs = append(errs, fmt.Errorf("--max-workload-cert-ttl=%s: must be at least --workload-cert-ttl=%s", c.maxTTL, c.ttl))
	}
	if err := ca.ValidateTrustDomain(c.trustDomain); err != nil {
		errs = append(errs, fmt.Errorf("--trust-domain=%q: %w", c.trustDomain, err))
	}
	if len(errs) > 0 {
		return ca.Options{}, true, errors.Join(errs...)
	}
	return ca.Options{
		Client: kube, Namespace: ns, TrustDomain: c.trustDomain, Addr: c.addr,
		WorkloadTTL: c.ttl, MaxWorkloadTTL: c.maxTTL, ServingDNSNames: ca.DNSNames(c.service, ns),
		Registerer: reg, Log: log.WithName("ca"),
	}, true, nil
}

// runWithCA runs the discovery server and, when enabled, the CA beside it;
// either failing stops both. With the CA, one gRPC server on the CA's
// address (15012, TLS with the CA's serving certificate) carries the
// certificate API and ADS; ADS streams there need a workload certificate.
func runWithCA(ctx context.Context, opts server.Options, o ca.Options, enabled bool) error {
	if !enabled {
		srv, err := server.New(opts)
		if err != nil {
			return err
		}
		return srv.Run(ctx)
	}
	c, err := ca.New(ctx, o)
	if err != nil {
		return err
	}
	opts.TLSAddr = cmpOr(o.Addr, ca.DefaultAddr)
	opts.TLS, opts.TLSServices, opts.TLSStreamInterceptor = c.TLSConfig(), c.Register, ca.RequireWorkloadCertificate
	srv, err := server.New(opts)
	if err != nil {
		return err
	}
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return srv.Run(ctx) })
	g.Go(func() error { return c.Start(ctx) })
	return g.Wait()
}

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}
