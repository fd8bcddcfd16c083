package xds_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	securityv1alpha1 "istio.io/api/security/v1alpha1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/identity"
	"github.com/meshlet/meshlet/proxy/l7"
	"github.com/meshlet/meshlet/proxy/xds"
	"github.com/meshlet/meshlet/webhook/ca"
	"github.com/meshlet/meshlet/webhook/discovery/server"
)

// workloadStore returns a Store holding a certificate for shop/client
// signed by a, with roots as its trust anchors.
func workloadStore(t *testing.T, a *ca.Authority, roots []*x509.Certificate) *identity.Store {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	id := ca.Identity{TrustDomain: ca.DefaultTrustDomain, Namespace: "shop", ServiceAccount: "client"}
	csr, err := ca.ParseCSR(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), id)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := a.Sign(csr, id, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	s := &identity.Store{}
	s.Set(&tls.Certificate{Certificate: [][]byte{chain[0].Raw}, PrivateKey: key, Leaf: chain[0]}, pool)
	return s
}

// TestEnvtestDiscoveryTLS runs `meshlet discovery`'s server with the mesh CA
// (webhook/ca on a real kube-apiserver) on one TLS port and plain text off:
// a proxy's xDS client presenting its workload certificate and verifying
// the server against the mesh roots and the Service's name gets a complete
// configuration; a client without a certificate is refused, one with a
// certificate of another CA is refused, and a client refuses a server that
// does not verify against its roots or not for the name it dials.
func TestEnvtestDiscoveryTLS(t *testing.T) {
	if testing.Short() {
		t.Skip("envtest tier: skipped with -short")
	}
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Skip("envtest tier: KUBEBUILDER_ASSETS is unset (test/bin/build-k8s.sh --print-dir)")
	}
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatalf("go list -m istio.io/api: %v", err)
	}
	crds := filepath.Join(strings.TrimSpace(string(out)), "kubernetes", "customresourcedefinitions.gen.yaml")
	env := &envtest.Environment{CRDInstallOptions: envtest.CRDInstallOptions{Paths: []string{crds}, ErrorIfPathMissing: true}}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("starting envtest: %v", err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	kube, ist := kubernetes.NewForConfigOrDie(cfg), istioclient.NewForConfigOrDie(cfg)
	ctx, cancel := context.WithCancel(context.Background())
	for _, ns := range []string{"istio-system", "shop"} {
		if _, err := kube.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	mesh, err := ca.New(ctx, ca.Options{Client: kube, Namespace: "istio-system", Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := server.New(server.Options{XDSAddr: "-", TLSAddr: "127.0.0.1:0", TLS: mesh.TLSConfig(), TLSServices: mesh.Register,
		TLSStreamInterceptor: ca.RequireWorkloadCertificate, MetricsAddr: "-", Replica: "discovery-0", Kube: kube, Istio: ist, Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-srv.Ready():
	case err := <-done:
		t.Fatalf("discovery stopped: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("discovery not ready after 60s")
	}
	if srv.XDSAddr() != nil {
		t.Errorf("plain-text xDS served on %s although disabled", srv.XDSAddr())
	}
	addr := srv.TLSAddr().String()
	const name = "istiod.istio-system.svc"

	authority := mesh.Server().Authority()
	other, err := ca.NewSelfSigned(time.Now(), time.Hour, ca.DefaultTrustDomain)
	if err != nil {
		t.Fatal(err)
	}
	foreign, err := ca.ParseSecret("other mesh", other, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	roots := authority.Roots()
	rootPool := x509.NewCertPool()
	for _, r := range roots {
		rootPool.AddCert(r)
	}

	client := func(t *testing.T, pod string, tlsCfg *tls.Config) *xds.Client {
		t.Helper()
		eng, err := l7.New(config.L7{}, l7.Options{AccessLog: io.Discard, Logger: slog.New(slog.DiscardHandler)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { eng.Close() })
		id := xds.Identity{PodName: pod, Namespace: "shop", IP: "127.0.0.1", ServiceAccount: "client", Labels: map[string]string{"app": "client"}}
		c, err := xds.New(xds.Options{Address: addr, Node: id.Node(), Engine: xds.EngineApplier(eng), TLS: tlsCfg,
			BackoffInitial: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		cctx, ccancel := context.WithCancel(context.Background())
		cdone := make(chan struct{})
		go func() { _ = c.Run(cctx); close(cdone) }()
		t.Cleanup(func() { ccancel(); <-cdone })
		return c
	}
	t.Run("workload certificate", func(t *testing.T) {
		t.Parallel()
		c := client(t, "good-0", workloadStore(t, authority, roots).ControlPlaneTLS(name))
		if err := c.WaitReady(context.Background(), 30*time.Second); err != nil {
			t.Fatalf("%v (status %+v)", err, c.Status())
		}
		if st := c.Status(); !st.Connected {
			t.Errorf("status %+v", st)
		}
	})
	t.Run("certificate API on the same port", func(t *testing.T) {
		t.Parallel()
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12, ServerName: name, RootCAs: rootPool})))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		cctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer not-a-token")
		_, err = securityv1alpha1.NewIstioCertificateServiceClient(conn).CreateCertificate(cctx, &securityv1alpha1.IstioCertificateRequest{Csr: "x"})
		// The CA itself answers (a TokenReview refused the token), without
		// a client certificate.
		if status.Code(err) != codes.Unauthenticated || strings.Contains(err.Error(), "needs a workload certificate") {
			t.Fatalf("CreateCertificate without a client certificate: %v, want the CA's Unauthenticated", err)
		}
	})
	refused := []struct {
		name string
		tls  func() *tls.Config
	}{
		{"no client certificate", func() *tls.Config {
			return &tls.Config{MinVersion: tls.VersionTLS12, ServerName: name, RootCAs: rootPool}
		}},
		{"client certificate of another CA", func() *tls.Config {
			return workloadStore(t, foreign, roots).ControlPlaneTLS(name)
		}},
		{"server not under the client's roots", func() *tls.Config {
			return workloadStore(t, authority, foreign.Roots()).ControlPlaneTLS(name)
		}},
		{"server not for the name dialled", func() *tls.Config {
			return workloadStore(t, authority, roots).ControlPlaneTLS("istiod.elsewhere.svc")
		}},
	}
	for i, tc := range refused {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := client(t, "refused-"+string(rune('a'+i)), tc.tls())
			if err := c.WaitReady(context.Background(), 2*time.Second); err == nil {
				t.Fatalf("configuration received (status %+v)", c.Status())
			}
			if st := c.Status(); st.Connected || len(st.Versions) > 0 {
				t.Errorf("status %+v", st)
			}
		})
	}
}
