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
)

// caFlags are the flags of the mesh CA and its certificate API, which run in
// the discovery process (webhook/ca).
type caFlags struct {
	addr, namespace, service string
	trustDomain              string
	ttl, maxTTL              time.Duration
}

func (c *caFlags) register(fl *pflag.FlagSet) {
	fl.StringVar(&c.addr, "ca-addr", ca.DefaultAddr, "address of the certificate API, gRPC over TLS (istiod's 15012; - disables the CA)")
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
// either failing stops both.
func runWithCA(ctx context.Context, run func(context.Context) error, o ca.Options, enabled bool) error {
	if !enabled {
		return run(ctx)
	}
	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return run(ctx) })
	g.Go(func() error { return ca.Run(ctx, o) })
	return g.Wait()
}
