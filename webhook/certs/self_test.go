package certs

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/go-logr/logr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// hangingAPI is an HTTP server that never answers: each request waits until
// its client goes away. started receives the path of each request as it
// arrives.
func hangingAPI(t *testing.T) (*kubernetes.Clientset, <-chan string) {
	t.Helper()
	started := make(chan string, 16)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		started <- r.URL.Path
		<-r.Context().Done()
	}))
	t.Cleanup(srv.Close)
	c, err := kubernetes.NewForConfig(&rest.Config{Host: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	return c, started
}

func newTestSelfIssued(t *testing.T, c kubernetes.Interface) *SelfIssued {
	t.Helper()
	s, err := NewSelfIssued(SelfIssuedOptions{
		Client: c, Namespace: "meshlet-system", SecretName: "meshlet-webhook-certs",
		WebhookConfigNames: []string{"meshlet-sidecar-injector"}, Policy: testPolicy, Log: logr.Discard(),
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// cancelWhenStarted cancels ctx as soon as the first request reaches the API.
func cancelWhenStarted(t *testing.T, started <-chan string) context.Context {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	t.Cleanup(cancel)
	go func() {
		select {
		case <-started:
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx
}

// TestReconcileCancelledIsAnError checks that a reconcile round whose
// request to the API server is cut by a cancelled context fails with the
// context's error, instead of passing as a success with no Secret (which
// dereferenced nil: client-go's retry.OnError reports such an error as nil).
func TestReconcileCancelledIsAnError(t *testing.T) {
	t.Parallel()
	c, started := hangingAPI(t)
	s := newTestSelfIssued(t, c)
	err := s.Reconcile(cancelWhenStarted(t, started))
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Reconcile with the context cancelled mid-request = %v, want an error wrapping context.Canceled", err)
	}
}

// TestPublishCancelledIsAnError checks the same for publishing the caBundle:
// a cut read of the webhook configuration is not a successful publication.
func TestPublishCancelledIsAnError(t *testing.T) {
	t.Parallel()
	c, started := hangingAPI(t)
	s := newTestSelfIssued(t, c)
	err := s.publish(cancelWhenStarted(t, started), []byte("bundle"))
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("publish with the context cancelled mid-request = %v, want an error wrapping context.Canceled", err)
	}
}
