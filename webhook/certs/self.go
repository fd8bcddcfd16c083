// Package certs gives the meshlet webhook its serving certificate and keeps
// the API server trusting it.
//
// Two sources implement [Source]:
//
//   - [SelfIssued] (the default) issues its own CA and serving certificate and
//     keeps them in one Secret (keys ca.crt, ca.key, tls.crt, tls.key) so they
//     survive restarts and are shared by every replica. Writes use the
//     Secret's resourceVersion (optimistic concurrency): when two replicas race,
//     one wins and the other adopts its result. Every reconcile round it copies
//     ca.crt into the caBundle of each named MutatingWebhookConfiguration
//     (the chart ships caBundle empty and nothing else writes it), swaps the
//     serving certificate in memory (hot reload, no restart), and rotates
//     certificates with a third of their life left. A CA rotation is two-phase:
//     the new CA is first added to the bundle next to the old one, and the
//     serving certificate moves to it only once every webhook configuration
//     trusts it, so no admission ever fails on a certificate change.
//   - [Files] (cert-manager mode) only reads tls.crt/tls.key from a directory
//     (the mounted cert-manager Secret) and reloads them when they change;
//     caBundle is cert-manager's cainjector's job.
//
// Both report readiness only once the serving certificate verifies against the
// caBundle the API server uses.
//
// RBAC needed by SelfIssued: get, update on secrets/<secret> in the webhook's
// namespace (plus create on secrets if the chart does not ship the Secret), and
// get, update on mutatingwebhookconfigurations/<name>. Files needs only get
// on mutatingwebhookconfigurations/<name> (for readiness).
package certs

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/util/retry"

	"github.com/meshlet/meshlet/internal/certpem"
)

// Source provides the webhook's serving certificate.
type Source interface {
	// GetCertificate is tls.Config.GetCertificate.
	GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error)
	// Ready returns nil once the serving certificate verifies against the
	// caBundle of every webhook configuration (a healthz.Checker).
	Ready(*http.Request) error
	// Start runs until ctx ends (a manager.Runnable).
	Start(ctx context.Context) error
}

// ErrNotInstalled means a named MutatingWebhookConfiguration does not exist
// (yet): certificates are kept in the Secret, but the source is not ready.
var ErrNotInstalled = errors.New("webhook configuration not installed")

// SelfIssuedOptions configure a SelfIssued source. Zero values mean the
// documented defaults.
type SelfIssuedOptions struct {
	// Client talks to the API server. Required.
	Client kubernetes.Interface
	// Namespace and SecretName name the certificate Secret. Required.
	Namespace  string
	SecretName string
	// WebhookConfigNames are the MutatingWebhookConfigurations whose caBundle
	// this source owns. Required (at least one).
	WebhookConfigNames []string
	// Policy for the certificates; Policy.DNSNames is required.
	Policy Policy
	// Interval between reconcile rounds. Zero means 10 seconds.
	Interval time.Duration
	// Now is the clock (tests). Nil means time.Now.
	Now func() time.Time
	// Log receives what the source does.
	Log logr.Logger
}

// SelfIssued issues, stores, publishes and rotates the webhook's certificates.
type SelfIssued struct {
	opts SelfIssuedOptions

	cert     atomic.Pointer[tls.Certificate]
	certPEM  atomic.Pointer[[]byte]
	seen     atomic.Pointer[map[string][]webhookBundle]
	reconMu  sync.Mutex
	rotated  prometheus.Counter
	expiry   prometheus.Gauge
	failures prometheus.Counter
}

var _ Source = (*SelfIssued)(nil)

// NewSelfIssued checks opts and returns a SelfIssued source. Call Start (or
// Reconcile) before serving.
func NewSelfIssued(opts SelfIssuedOptions) (*SelfIssued, error) {
	var errs []error
	if opts.Client == nil {
		errs = append(errs, errors.New("certs: no API client"))
	}
	if opts.Namespace == "" {
		errs = append(errs, errors.New("certs: namespace is empty"))
	}
	if opts.SecretName == "" {
		errs = append(errs, errors.New("certs: secret name is empty"))
	}
	if len(opts.WebhookConfigNames) == 0 {
		errs = append(errs, errors.New("certs: no webhook configuration names"))
	}
	if len(opts.Policy.DNSNames) == 0 {
		errs = append(errs, errors.New("certs: no DNS names for the serving certificate"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if opts.Interval <= 0 {
		opts.Interval = 10 * time.Second
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	s := &SelfIssued{
		opts: opts,
		rotated: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshlet_webhook_certificate_writes_total",
			Help: "Times this replica wrote new certificates to the Secret (creation and rotation).",
		}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "meshlet_webhook_certificate_reconcile_errors_total",
			Help: "Certificate reconcile rounds that failed (retried next round).",
		}),
		expiry: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "meshlet_webhook_serving_certificate_expiry_timestamp_seconds",
			Help: "NotAfter of the serving certificate in use, as a Unix time.",
		}),
	}
	return s, nil
}

// Collectors returns the source's Prometheus metrics for registration.
func (s *SelfIssued) Collectors() []prometheus.Collector {
	return []prometheus.Collector{s.rotated, s.failures, s.expiry}
}

// GetCertificate returns the current serving certificate.
func (s *SelfIssued) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c := s.cert.Load()
	if c == nil {
		return nil, errors.New("no serving certificate yet")
	}
	return c, nil
}

// webhookBundle is the caBundle one webhook of a configuration had when a
// reconcile round last read (or wrote) it.
type webhookBundle struct {
	webhook string
	bundle  []byte
}

// Ready reports whether the serving certificate in use verifies, now, against
// the caBundle of every webhook of every named configuration as the last
// reconcile round found them. It depends only on that state: a round that
// fails to reach the API server keeps what was seen before instead of turning
// the replica not ready.
func (s *SelfIssued) Ready(*http.Request) error {
	crt := s.certPEM.Load()
	if crt == nil {
		return errors.New("no serving certificate loaded yet")
	}
	seen := s.seen.Load()
	if seen == nil {
		return errors.New("webhook configurations not read yet")
	}
	for _, name := range s.opts.WebhookConfigNames {
		whs, ok := (*seen)[name]
		if !ok {
			return fmt.Errorf("mutatingwebhookconfiguration %s: %w", name, ErrNotInstalled)
		}
		for _, wh := range whs {
			if err := Verify(*crt, wh.bundle, s.opts.Policy.DNSNames[0], s.opts.Now()); err != nil {
				return fmt.Errorf("mutatingwebhookconfiguration %s webhook %s: %w", name, wh.webhook, err)
			}
		}
	}
	return nil
}

// Start reconciles at once and then every Interval until ctx ends. A failed
// round is logged and retried; Start returns nil when ctx ends.
func (s *SelfIssued) Start(ctx context.Context) error {
	t := time.NewTicker(s.opts.Interval)
	defer t.Stop()
	for {
		switch err := s.Reconcile(ctx); {
		case err == nil || ctx.Err() != nil:
		case errors.Is(err, ErrNotInstalled):
			s.opts.Log.Info("Waiting for the webhook configuration", "reason", err.Error())
		default:
			s.failures.Inc()
			s.opts.Log.Error(err, "Reconciling webhook certificates")
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// Reconcile runs one round: read (or create) the Secret, rotate what is due,
// publish ca.crt as caBundle, load the serving certificate, update readiness.
func (s *SelfIssued) Reconcile(ctx context.Context) error {
	s.reconMu.Lock()
	defer s.reconMu.Unlock()
	secret, err := s.ensureSecret(ctx)
	if err != nil {
		return err
	}
	if err := s.load(secret.Data); err != nil {
		return err
	}
	if err := s.publish(ctx, secret.Data[KeyCABundle]); err != nil {
		return err
	}
	return s.Ready(nil)
}

// ensureSecret reads the Secret, applies Plan, and writes the result with
// optimistic concurrency, retrying on conflicts (another replica won: its
// result is read back and planned again, usually to no change).
func (s *SelfIssued) ensureSecret(ctx context.Context) (*corev1.Secret, error) {
	secrets := s.opts.Client.CoreV1().Secrets(s.opts.Namespace)
	var out *corev1.Secret
	err := retryOnError(func(err error) bool {
		return apierrors.IsConflict(err) || apierrors.IsAlreadyExists(err)
	}, func() error {
		cur, err := secrets.Get(ctx, s.opts.SecretName, metav1.GetOptions{})
		notFound := apierrors.IsNotFound(err)
		if err != nil && !notFound {
			return fmt.Errorf("reading secret %s/%s: %w", s.opts.Namespace, s.opts.SecretName, err)
		}
		var data map[string][]byte
		if !notFound {
			data = cur.Data
		}
		published, err := s.publishedCheck(ctx)
		if err != nil {
			return err
		}
		next, changed, reason, err := Plan(data, s.opts.Now(), s.opts.Policy, published)
		if err != nil {
			return fmt.Errorf("planning certificates for secret %s/%s: %w", s.opts.Namespace, s.opts.SecretName, err)
		}
		if notFound {
			cur = &corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{Name: s.opts.SecretName, Namespace: s.opts.Namespace,
					Labels: map[string]string{"app.kubernetes.io/managed-by": "meshlet-webhook"}},
				Type: corev1.SecretTypeOpaque,
				Data: next,
			}
			out, err = secrets.Create(ctx, cur, metav1.CreateOptions{})
			if err != nil {
				return fmt.Errorf("creating secret %s/%s: %w", s.opts.Namespace, s.opts.SecretName, err)
			}
			s.rotated.Inc()
			s.opts.Log.Info("Created webhook certificate secret", "secret", s.opts.SecretName, "reason", reason)
			return nil
		}
		if !changed {
			out = cur
			return nil
		}
		cur = cur.DeepCopy()
		cur.Data = next
		out, err = secrets.Update(ctx, cur, metav1.UpdateOptions{})
		if err != nil {
			return fmt.Errorf("updating secret %s/%s: %w", s.opts.Namespace, s.opts.SecretName, err)
		}
		s.rotated.Inc()
		s.opts.Log.Info("Wrote webhook certificates", "secret", s.opts.SecretName, "reason", reason)
		return nil
	})
	return out, err
}

// retryOnError runs fn until it succeeds or fails with an error retriable
// does not accept, retry.DefaultRetry's number of times at most, and returns
// fn's last error. retry.OnError alone is not enough: in the client-go we use (v0.36)
// it reports a non-retriable error that wraps a context error (a request cut
// by a cancelled context) as the last retriable error, which is nil when
// there was none, so a cancelled round would look like a successful one.
func retryOnError(retriable func(error) bool, fn func() error) error {
	var last error
	err := retry.OnError(retry.DefaultRetry, retriable, func() error {
		last = fn()
		return last
	})
	if last != nil {
		return last
	}
	return err
}

// publishedCheck returns a function telling whether a CA is in the caBundle
// of every webhook configuration right now.
func (s *SelfIssued) publishedCheck(ctx context.Context) (func(*x509.Certificate) bool, error) {
	var bundles [][]*x509.Certificate
	for _, name := range s.opts.WebhookConfigNames {
		cfg, err := s.opts.Client.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			bundles = append(bundles, nil) // not installed yet: trusts nothing
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("reading mutatingwebhookconfiguration %s: %w", name, err)
		}
		for _, wh := range cfg.Webhooks {
			cas, _ := certpem.ParseCertificates(wh.ClientConfig.CABundle)
			bundles = append(bundles, cas)
		}
	}
	return func(ca *x509.Certificate) bool {
		for _, b := range bundles {
			if !containsCert(b, ca) {
				return false
			}
		}
		return true
	}, nil
}

// publish writes bundle into the caBundle of every webhook of every named
// configuration that differs, and records what each configuration holds
// afterwards (what was read, if the write failed; nothing new, if even the
// read failed) for Ready.
func (s *SelfIssued) publish(ctx context.Context, bundle []byte) error {
	api := s.opts.Client.AdmissionregistrationV1().MutatingWebhookConfigurations()
	seen := map[string][]webhookBundle{}
	if old := s.seen.Load(); old != nil {
		for k, v := range *old {
			seen[k] = v
		}
	}
	defer s.seen.Store(&seen)
	for _, name := range s.opts.WebhookConfigNames {
		var now []webhookBundle
		read := false
		err := retryOnError(apierrors.IsConflict, func() error {
			cfg, err := api.Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return err
			}
			read, now = true, now[:0]
			stale := false
			for i := range cfg.Webhooks {
				now = append(now, webhookBundle{cfg.Webhooks[i].Name, cfg.Webhooks[i].ClientConfig.CABundle})
				if !bytes.Equal(cfg.Webhooks[i].ClientConfig.CABundle, bundle) {
					stale = true
					cfg.Webhooks[i].ClientConfig.CABundle = bundle
				}
			}
			if stale {
				if _, err := api.Update(ctx, cfg, metav1.UpdateOptions{}); err != nil {
					return err
				}
				for i := range now {
					now[i].bundle = bundle
				}
				s.opts.Log.Info("Published caBundle", "mutatingwebhookconfiguration", name)
			}
			return nil
		})
		switch {
		case apierrors.IsNotFound(err):
			delete(seen, name)
		case read:
			seen[name] = slices.Clone(now)
		}
		if apierrors.IsNotFound(err) {
			// Installed after the webhook (Helm creates webhook
			// configurations late): not ready until it exists.
			return fmt.Errorf("mutatingwebhookconfiguration %s does not exist yet: %w", name, ErrNotInstalled)
		}
		if err != nil {
			return fmt.Errorf("publishing caBundle to mutatingwebhookconfiguration %s: %w", name, err)
		}
	}
	return nil
}

// load swaps in the serving certificate from data if it changed.
func (s *SelfIssued) load(data map[string][]byte) error {
	crt := data[KeyCert]
	if p := s.certPEM.Load(); p != nil && bytes.Equal(*p, crt) {
		return nil
	}
	pair, err := tls.X509KeyPair(crt, data[KeyKey])
	if err != nil {
		return fmt.Errorf("loading serving certificate from secret %s/%s: %w", s.opts.Namespace, s.opts.SecretName, err)
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		return fmt.Errorf("parsing serving certificate: %w", err)
	}
	pair.Leaf = leaf
	crt = bytes.Clone(crt)
	s.cert.Store(&pair)
	s.certPEM.Store(&crt)
	s.expiry.Set(float64(leaf.NotAfter.Unix()))
	s.opts.Log.Info("Serving certificate loaded", "notAfter", leaf.NotAfter.UTC().Format(time.RFC3339), "serial", leaf.SerialNumber.Text(16))
	return nil
}
