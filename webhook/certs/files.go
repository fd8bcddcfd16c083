package certs

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/go-logr/logr"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/certwatcher"
)

// FilesOptions configure a Files source (cert-manager mode).
type FilesOptions struct {
	// Dir holds tls.crt and tls.key (the mounted cert-manager Secret). Required.
	Dir string
	// Client reads the webhook configurations for readiness. Nil skips the
	// caBundle check (the source is then ready once a certificate is loaded).
	Client kubernetes.Interface
	// WebhookConfigNames whose caBundle must trust the certificate.
	WebhookConfigNames []string
	// DNSName the API server dials (service.namespace.svc).
	DNSName string
	// Log receives what the source does.
	Log logr.Logger
}

// Files serves a certificate that someone else (cert-manager) issues and
// publishes; it never writes to the API server.
type Files struct {
	opts    FilesOptions
	watcher *certwatcher.CertWatcher
}

var _ Source = (*Files)(nil)

// NewFiles loads the certificate from opts.Dir; it fails if none is there.
func NewFiles(opts FilesOptions) (*Files, error) {
	if opts.Dir == "" {
		return nil, errors.New("certs: certificate directory is empty")
	}
	w, err := certwatcher.New(filepath.Join(opts.Dir, KeyCert), filepath.Join(opts.Dir, KeyKey))
	if err != nil {
		return nil, fmt.Errorf("loading serving certificate from %s: %w", opts.Dir, err)
	}
	return &Files{opts: opts, watcher: w.WithWatchInterval(10 * time.Second)}, nil
}

// GetCertificate returns the certificate last read from disk.
func (f *Files) GetCertificate(h *tls.ClientHelloInfo) (*tls.Certificate, error) {
	return f.watcher.GetCertificate(h)
}

// Start watches the directory for changes until ctx ends.
func (f *Files) Start(ctx context.Context) error { return f.watcher.Start(ctx) }

// Ready checks the certificate on disk against each webhook configuration's
// caBundle (read live: cert-manager's cainjector may update it at any time).
func (f *Files) Ready(r *http.Request) error {
	crt, err := os.ReadFile(filepath.Join(f.opts.Dir, KeyCert))
	if err != nil {
		return fmt.Errorf("reading serving certificate: %w", err)
	}
	if f.opts.Client == nil {
		return nil
	}
	ctx := context.Background()
	if r != nil {
		ctx = r.Context()
	}
	for _, name := range f.opts.WebhookConfigNames {
		cfg, err := f.opts.Client.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return fmt.Errorf("reading mutatingwebhookconfiguration %s: %w", name, err)
		}
		for _, wh := range cfg.Webhooks {
			if err := Verify(crt, wh.ClientConfig.CABundle, f.opts.DNSName, time.Now()); err != nil {
				return fmt.Errorf("mutatingwebhookconfiguration %s webhook %s: %w", name, wh.Name, err)
			}
		}
	}
	return nil
}
