package ca

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// Secret names in the control plane's namespace (Istio's).
const (
	// PluginSecretName is the user's plug-in CA Secret.
	PluginSecretName = "cacerts"
	// SelfSignedSecretName holds the self-signed root when there is no
	// plug-in CA.
	SelfSignedSecretName = "istio-ca-secret"
	// SelfSignedSecretType is the type Istio gives istio-ca-secret.
	SelfSignedSecretType corev1.SecretType = "istio.io/ca-root"
)

// DefaultRootValidity is the lifetime of a new self-signed root (Istio's).
const DefaultRootValidity = 10 * 365 * 24 * time.Hour

// StoreOptions say where the CA's material lives.
type StoreOptions struct {
	// Client talks to the API server. Required.
	Client kubernetes.Interface
	// Namespace is the control plane's namespace. Required.
	Namespace string
	// TrustDomain goes into a new self-signed root's subject.
	TrustDomain string
	// RootValidity of a new self-signed root. Zero means DefaultRootValidity.
	RootValidity time.Duration
	// Now is the clock. Nil means time.Now.
	Now func() time.Time
	// Log receives what the store does.
	Log logr.Logger
}

// Load returns the CA: the plug-in cacerts Secret if it exists, otherwise the
// self-signed root of istio-ca-secret, created if absent. When two callers
// race to create it, the API server lets one Create succeed; the other gets
// AlreadyExists and reads the winner's, so both end with the same root.
//
// A cacerts Secret that exists but cannot be used is an error: falling back
// to a self-signed root would silently split the mesh's trust.
func Load(ctx context.Context, o StoreOptions) (*Authority, error) {
	if o.Client == nil || o.Namespace == "" {
		return nil, errors.New("ca: API client and namespace are required")
	}
	now := time.Now
	if o.Now != nil {
		now = o.Now
	}
	secrets := o.Client.CoreV1().Secrets(o.Namespace)
	plug, err := secrets.Get(ctx, PluginSecretName, metav1.GetOptions{})
	switch {
	case err == nil:
		return ParseSecret(fmt.Sprintf("secret %s/%s", o.Namespace, PluginSecretName), plug.Data, now())
	case !apierrors.IsNotFound(err):
		return nil, fmt.Errorf("reading secret %s/%s: %w", o.Namespace, PluginSecretName, err)
	}
	source := fmt.Sprintf("secret %s/%s", o.Namespace, SelfSignedSecretName)
	cur, err := secrets.Get(ctx, SelfSignedSecretName, metav1.GetOptions{})
	if err == nil {
		return ParseSecret(source, cur.Data, now())
	}
	if !apierrors.IsNotFound(err) {
		return nil, fmt.Errorf("reading %s: %w", source, err)
	}
	validity := o.RootValidity
	if validity <= 0 {
		validity = DefaultRootValidity
	}
	data, err := NewSelfSigned(now(), validity, o.TrustDomain)
	if err != nil {
		return nil, err
	}
	created, err := secrets.Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{
			Name: SelfSignedSecretName, Namespace: o.Namespace,
			Labels: map[string]string{"app.kubernetes.io/managed-by": "meshlet"},
		},
		Type: SelfSignedSecretType,
		Data: data,
	}, metav1.CreateOptions{})
	switch {
	case err == nil:
		o.Log.Info("Created self-signed mesh root", "secret", SelfSignedSecretName, "namespace", o.Namespace)
		return ParseSecret(source, created.Data, now())
	case apierrors.IsAlreadyExists(err):
		// Another replica won the race: use its root, never ours.
		winner, err := secrets.Get(ctx, SelfSignedSecretName, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("reading %s after losing the race to create it: %w", source, err)
		}
		o.Log.Info("Using the mesh root another replica created", "secret", SelfSignedSecretName, "namespace", o.Namespace)
		return ParseSecret(source, winner.Data, now())
	default:
		return nil, fmt.Errorf("creating %s: %w", source, err)
	}
}
