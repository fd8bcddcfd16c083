package ca

import (
	"context"
	"crypto/x509"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/internal/certpem"
)

// TestCreateCertificateWithTokenReview: a sidecar's projected token (audience
// istio-ca) and a CSR give a certificate chain whose leaf carries exactly the
// token's SPIFFE ID and verifies against the root published in the
// namespace; a CSR that asks for no SAN gets the same identity.
func TestCreateCertificateWithTokenReview(t *testing.T) {
	envtestSkip(t)
	cp := newNamespace(t, "istio-system")
	app := newNamespace(t, "team-a")
	ca := startCA(t, cp, nil)
	token := serviceAccountToken(t, app, "reviews", DefaultAudience)
	want := spiffe(app, "reviews")

	for name, uris := range map[string][]string{"own SAN": {want}, "no SAN": nil} {
		t.Run(name, func(t *testing.T) {
			csr, key := newCSR(t, uris...)
			resp, err := ca.request(token, csr, 0)
			if err != nil {
				t.Fatalf("CreateCertificate: %v", err)
			}
			chain := parseChain(t, resp)
			verifyLeaf(t, chain, ca.roots, want, key.Public())
			if life := time.Until(chain[0].NotAfter); life < 23*time.Hour || life > 24*time.Hour {
				t.Errorf("leaf expires in %s, want the default 24h", life)
			}
		})
	}
	// The app namespace got the same root, so its sidecars trust the leaf.
	root := waitRootConfigMap(t, app, nil)
	if want := waitRootConfigMap(t, cp, nil); root != want {
		t.Errorf("root in %s differs from the root in %s", app, cp)
	}
}

// TestCreateCertificateRefused: everything that must not get a certificate
// is refused with the right gRPC code and a message saying why.
func TestCreateCertificateRefused(t *testing.T) {
	envtestSkip(t)
	cp := newNamespace(t, "istio-system")
	app := newNamespace(t, "team-a")
	ca := startCA(t, cp, nil)
	reviews := spiffe(app, "reviews")
	good := serviceAccountToken(t, app, "reviews", DefaultAudience)
	other := serviceAccountToken(t, app, "ratings", DefaultAudience)
	wrongAudience := serviceAccountToken(t, app, "reviews", "some-other-audience")
	// A token for the API server itself (no audience asked: the API
	// server's own) must not be replayable against the CA.
	apiAudience := serviceAccountToken(t, app, "reviews")
	expired := reissueToken(t, good, time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour))
	// The same re-signing with a future expiry is accepted: what refuses
	// the expired token is its expiry, not the re-signing.
	resigned := reissueToken(t, good, time.Now().Add(-time.Minute), time.Now().Add(time.Hour))
	csr, _ := newCSR(t, reviews)
	if _, err := ca.request(resigned, csr, 0); err != nil {
		t.Fatalf("re-signed unexpired token refused (the expired-token case would prove nothing): %v", err)
	}
	cases := []struct {
		name     string
		token    string
		csr      []byte
		code     codes.Code
		contains string
	}{
		{"no token", "", csr, codes.Unauthenticated, "no authorization metadata"},
		{"garbage token", "not-a-jwt", csr, codes.Unauthenticated, "not authenticated"},
		{"expired token", expired, csr, codes.Unauthenticated, "expired"},
		{"wrong audience", wrongAudience, csr, codes.Unauthenticated, "audience"},
		{"API server audience", apiAudience, csr, codes.Unauthenticated, "audience"},
		{"another service account asking for reviews", other, csr, codes.PermissionDenied, reviews},
		{"own token asking for another namespace", good, mustCSR(t, spiffe("kube-system", "reviews")), codes.PermissionDenied, "kube-system"},
		{"own token asking for another trust domain", good, mustCSR(t, "spiffe://evil.example/ns/"+app+"/sa/reviews"), codes.PermissionDenied, "evil.example"},
		{"own token asking for an extra DNS SAN", good, csrWithDNS(t, "reviews."+app+".svc"), codes.PermissionDenied, "DNS SAN"},
		{"not PEM", good, []byte("hello"), codes.InvalidArgument, "not PEM"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := ca.request(tc.token, tc.csr, 0)
			if err == nil {
				t.Fatalf("issued %d certificates, want %s", len(resp.GetCertChain()), tc.code)
			}
			st, _ := status.FromError(err)
			if st.Code() != tc.code || !strings.Contains(st.Message(), tc.contains) {
				t.Errorf("got %s %q, want %s containing %q", st.Code(), st.Message(), tc.code, tc.contains)
			}
		})
	}
}

// TestCreateCertificateValidity: a requested lifetime is honoured up to the
// cap and clamped above it; a negative one is refused.
func TestCreateCertificateValidity(t *testing.T) {
	envtestSkip(t)
	cp := newNamespace(t, "istio-system")
	app := newNamespace(t, "team-a")
	ca := startCA(t, cp, func(o *Options) { o.WorkloadTTL, o.MaxWorkloadTTL = time.Hour, 48*time.Hour })
	token := serviceAccountToken(t, app, "reviews", DefaultAudience)
	for _, tc := range []struct {
		seconds int64
		want    time.Duration
	}{{0, time.Hour}, {600, 10 * time.Minute}, {int64(200 * 24 * time.Hour / time.Second), 48 * time.Hour}} {
		csr, _ := newCSR(t)
		resp, err := ca.request(token, csr, tc.seconds)
		if err != nil {
			t.Fatalf("validity %d: %v", tc.seconds, err)
		}
		leaf := parseChain(t, resp)[0]
		if got := time.Until(leaf.NotAfter); got > tc.want || got < tc.want-time.Minute {
			t.Errorf("validity_duration %d: leaf expires in %s, want %s", tc.seconds, got.Round(time.Second), tc.want)
		}
	}
	csr, _ := newCSR(t)
	if _, err := ca.request(token, csr, -5); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "validity_duration -5") {
		t.Errorf("negative validity: %v, want InvalidArgument naming validity_duration", err)
	}
}

// TestSelfSignedRootRace: replicas starting together on a namespace without a
// CA Secret all end with the one root the API server let be created.
func TestSelfSignedRootRace(t *testing.T) {
	envtestSkip(t)
	cp := newNamespace(t, "istio-system")
	const replicas = 8
	got := make([]*Authority, replicas)
	errs := make([]error, replicas)
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range replicas {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			got[i], errs[i] = Load(context.Background(), StoreOptions{Client: api.kube, Namespace: cp, TrustDomain: DefaultTrustDomain, Log: testr.New(t)})
		}()
	}
	close(start)
	wg.Wait()
	sec, err := api.kube.CoreV1().Secrets(cp).Get(context.Background(), SelfSignedSecretName, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("reading %s: %v", SelfSignedSecretName, err)
	}
	stored, err := certpem.ParseCertificates(sec.Data[KeyCACert])
	if err != nil || len(stored) != 1 {
		t.Fatalf("stored root: %d certificates, %v", len(stored), err)
	}
	for i := range replicas {
		if errs[i] != nil {
			t.Errorf("replica %d: %v", i, errs[i])
			continue
		}
		if !got[i].Certificate().Equal(stored[0]) {
			t.Errorf("replica %d signs with %s serial %s, the Secret holds serial %s", i, got[i].Certificate().Subject, got[i].Certificate().SerialNumber, stored[0].SerialNumber)
		}
	}
	if sec.Type != SelfSignedSecretType {
		t.Errorf("secret type %q, want %q", sec.Type, SelfSignedSecretType)
	}
}

// TestPluginCA: with Istio's cacerts Secret present, the user's intermediate
// signs, the chain is leaf, intermediate, root, and the published root is the
// user's root.
func TestPluginCA(t *testing.T) {
	envtestSkip(t)
	cp := newNamespace(t, "istio-system")
	app := newNamespace(t, "team-a")
	pki := newTestPKI(t)
	if _, err := api.kube.CoreV1().Secrets(cp).Create(context.Background(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: PluginSecretName}, Data: pki.cacerts(),
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ca := startCA(t, cp, nil)
	if root := waitRootConfigMap(t, app, nil); root != string(pki.rootPEM) {
		t.Errorf("published root is not the plug-in root-cert.pem:\n%s", root)
	}
	token := serviceAccountToken(t, app, "reviews", DefaultAudience)
	csr, key := newCSR(t)
	resp, err := ca.request(token, csr, 0)
	if err != nil {
		t.Fatalf("CreateCertificate: %v", err)
	}
	chain := parseChain(t, resp)
	if len(chain) != 3 || !chain[1].Equal(pki.inter) || !chain[2].Equal(pki.root) {
		t.Fatalf("chain of %d: want leaf, the plug-in intermediate, the plug-in root", len(chain))
	}
	roots := x509.NewCertPool()
	roots.AddCert(pki.root)
	verifyLeaf(t, chain, roots, spiffe(app, "reviews"), key.Public())
	if _, err := api.kube.CoreV1().Secrets(cp).Get(context.Background(), SelfSignedSecretName, metav1.GetOptions{}); err == nil {
		t.Errorf("a self-signed %s was created although cacerts exists", SelfSignedSecretName)
	}
}

// TestPluginCABrokenIsAnError: a cacerts Secret that cannot be used stops the
// CA with an error naming the Secret and key, instead of silently falling back
// to a self-signed root.
func TestPluginCABrokenIsAnError(t *testing.T) {
	envtestSkip(t)
	cp := newNamespace(t, "istio-system")
	pki := newTestPKI(t)
	data := pki.cacerts()
	data[KeyRootCert] = newTestPKI(t).rootPEM // a root that did not sign the intermediate
	if _, err := api.kube.CoreV1().Secrets(cp).Create(context.Background(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: PluginSecretName}, Data: data,
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	_, err := New(context.Background(), Options{Client: api.kube, Namespace: cp, Log: testr.New(t)})
	if err == nil || !strings.Contains(err.Error(), "secret "+cp+"/cacerts") || !strings.Contains(err.Error(), KeyCACert) {
		t.Fatalf("New with a broken cacerts: %v; want an error naming secret %s/cacerts and %s", err, cp, KeyCACert)
	}
}

// TestRootConfigMapKeptCurrent: the root ConfigMap appears in a namespace
// created while the CA runs, and comes back when deleted or edited.
func TestRootConfigMapKeptCurrent(t *testing.T) {
	envtestSkip(t)
	cp := newNamespace(t, "istio-system")
	startCA(t, cp, nil)
	want := waitRootConfigMap(t, cp, nil)
	is := func(s string) bool { return s == want }
	ns := newNamespace(t, "late")
	waitRootConfigMap(t, ns, is)

	cms := api.kube.CoreV1().ConfigMaps(ns)
	if err := cms.Delete(context.Background(), RootConfigMapName, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	waitRootConfigMap(t, ns, is)

	cm, err := cms.Get(context.Background(), RootConfigMapName, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cm.Data[RootConfigMapKey] = "tampered"
	if _, err := cms.Update(context.Background(), cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	waitRootConfigMap(t, ns, is)
}

// TestPluginCAAddedLater: adding cacerts to a running CA switches signing to
// it and republishes the root everywhere.
func TestPluginCAAddedLater(t *testing.T) {
	envtestSkip(t)
	cp := newNamespace(t, "istio-system")
	app := newNamespace(t, "team-a")
	startCA(t, cp, nil)
	old := waitRootConfigMap(t, app, nil)
	pki := newTestPKI(t)
	if _, err := api.kube.CoreV1().Secrets(cp).Create(context.Background(), &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: PluginSecretName}, Data: pki.cacerts(),
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	got := waitRootConfigMap(t, app, func(s string) bool { return s != old })
	if got != string(pki.rootPEM) {
		t.Errorf("root after adding cacerts is not the plug-in root")
	}
}

func mustCSR(t testing.TB, uris ...string) []byte {
	csr, _ := newCSR(t, uris...)
	return csr
}
