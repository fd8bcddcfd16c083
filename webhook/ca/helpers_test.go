package ca

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/testr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	securityv1alpha1 "istio.io/api/security/v1alpha1"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/utils/ptr"

	"github.com/meshlet/meshlet/internal/certpem"
	"github.com/meshlet/meshlet/webhook/certs"
)

// newNamespace creates a namespace with a unique name starting with prefix
// and deletes it when the test ends.
func newNamespace(t testing.TB, prefix string) string {
	t.Helper()
	ns, err := api.kube.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{
		ObjectMeta: metav1.ObjectMeta{GenerateName: prefix + "-"},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating namespace: %v", err)
	}
	t.Cleanup(func() {
		_ = api.kube.CoreV1().Namespaces().Delete(context.Background(), ns.Name, metav1.DeleteOptions{})
	})
	return ns.Name
}

// serviceAccountToken creates service account ns/sa (if needed) and returns a
// token for it valid for audiences, issued by the API server's TokenRequest.
func serviceAccountToken(t testing.TB, ns, sa string, audiences ...string) string {
	t.Helper()
	ctx := context.Background()
	_, err := api.kube.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa}}, metav1.CreateOptions{})
	if err != nil && !strings.Contains(err.Error(), "already exists") {
		t.Fatalf("creating service account %s/%s: %v", ns, sa, err)
	}
	tr, err := api.kube.CoreV1().ServiceAccounts(ns).CreateToken(ctx, sa, &authnv1.TokenRequest{
		Spec: authnv1.TokenRequestSpec{Audiences: audiences, ExpirationSeconds: ptr.To[int64](3600)},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("requesting a token for %s/%s: %v", ns, sa, err)
	}
	return tr.Status.Token
}

// reissueToken returns token with its time claims moved so that it was issued
// at iat and expires at exp, signed again with the API server's
// service-account signing key: a token the API server itself could have
// issued, had the clock been elsewhere. TokenRequest refuses lifetimes under
// ten minutes, so this is how a test gets an expired token.
func reissueToken(t testing.TB, token string, iat, exp time.Time) string {
	t.Helper()
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("token has %d parts", len(parts))
	}
	var header map[string]any
	var claims map[string]any
	for i, v := range []any{&header, &claims} {
		raw, err := base64.RawURLEncoding.DecodeString(parts[i])
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(raw, v); err != nil {
			t.Fatal(err)
		}
	}
	if header["alg"] != "ES256" {
		t.Fatalf("token algorithm %v, want ES256 (envtest's signing key is ECDSA P-256)", header["alg"])
	}
	claims["iat"], claims["nbf"], claims["exp"] = iat.Unix(), iat.Unix(), exp.Unix()
	hb, _ := json.Marshal(header)
	cb, _ := json.Marshal(claims)
	signing := base64.RawURLEncoding.EncodeToString(hb) + "." + base64.RawURLEncoding.EncodeToString(cb)
	keyPEM, err := os.ReadFile(filepath.Join(api.certDir, "sa-signer.key"))
	if err != nil {
		t.Fatalf("reading the API server's token signing key: %v", err)
	}
	block, _ := pem.Decode(keyPEM)
	if block == nil {
		t.Fatal("sa-signer.key is not PEM")
	}
	var key *ecdsa.PrivateKey
	if k, err := x509.ParsePKCS8PrivateKey(block.Bytes); err == nil {
		key, _ = k.(*ecdsa.PrivateKey)
	} else if k, err := x509.ParseECPrivateKey(block.Bytes); err == nil {
		key = k
	}
	if key == nil {
		t.Fatalf("sa-signer.key (%s) is not an ECDSA key", block.Type)
	}
	sum := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, key, sum[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := append(r.FillBytes(make([]byte, 32)), s.FillBytes(make([]byte, 32))...)
	return signing + "." + base64.RawURLEncoding.EncodeToString(sig)
}

// newCSR returns a PEM CSR for a fresh P-256 key asking for uris.
func newCSR(t testing.TB, uris ...string) ([]byte, crypto.Signer) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		p, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, p)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), key
}

// runningCA is Run serving on a loopback port, and a client for it.
type runningCA struct {
	ns     string
	addr   string
	roots  *x509.CertPool
	client securityv1alpha1.IstioCertificateServiceClient
	stop   func()
}

// startCA runs the whole CA (Run) for control plane namespace ns and dials it
// over TLS, trusting the root the CA published in ns's ConfigMap (as a
// sidecar would).
func startCA(t testing.TB, ns string, mod func(*Options)) *runningCA {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	log := logr.Discard() // benchmarks: no per-request logging
	if tt, ok := t.(*testing.T); ok {
		log = testr.New(tt)
	}
	o := Options{Client: api.kube, Namespace: ns, Listener: ln, Log: log}
	if mod != nil {
		mod(&o)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, o) }()
	stop := func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}
	t.Cleanup(func() {
		if ctx.Err() == nil {
			stop()
		}
	})
	root := waitRootConfigMap(t, ns, nil)
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM([]byte(root)) {
		t.Fatalf("configmap %s/%s holds no certificate", ns, RootConfigMapName)
	}
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: pool, ServerName: "istiod." + ns + ".svc", MinVersion: tls.VersionTLS12,
	})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &runningCA{ns: ns, addr: ln.Addr().String(), roots: pool, client: securityv1alpha1.NewIstioCertificateServiceClient(conn), stop: stop}
}

// waitRootConfigMap waits until ns has the root ConfigMap (and, if want is
// not nil, until want accepts its content) and returns root-cert.pem.
func waitRootConfigMap(t testing.TB, ns string, want func(string) bool) string {
	t.Helper()
	var root string
	err := wait.PollUntilContextTimeout(context.Background(), 20*time.Millisecond, 30*time.Second, true, func(ctx context.Context) (bool, error) {
		cm, err := api.kube.CoreV1().ConfigMaps(ns).Get(ctx, RootConfigMapName, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		root = cm.Data[RootConfigMapKey]
		return root != "" && (want == nil || want(root)), nil
	})
	if err != nil {
		t.Fatalf("configmap %s/%s: never had the expected %s (last: %q): %v", ns, RootConfigMapName, RootConfigMapKey, root, err)
	}
	return root
}

// request calls CreateCertificate with token as the bearer.
func (c *runningCA) request(token string, csr []byte, validity int64) (*securityv1alpha1.IstioCertificateResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	return c.client.CreateCertificate(ctx, &securityv1alpha1.IstioCertificateRequest{Csr: string(csr), ValidityDuration: validity})
}

// parseChain decodes a response's chain, one certificate per element.
func parseChain(t testing.TB, resp *securityv1alpha1.IstioCertificateResponse) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for i, p := range resp.GetCertChain() {
		cs, err := certpem.ParseCertificates([]byte(p))
		if err != nil || len(cs) != 1 {
			t.Fatalf("cert_chain[%d]: %d certificates, %v", i, len(cs), err)
		}
		out = append(out, cs[0])
	}
	if len(out) < 2 {
		t.Fatalf("cert_chain has %d certificates, want the leaf and at least the root", len(out))
	}
	return out
}

// verifyLeaf checks chain[0] against roots through the chain's middle and
// that it carries exactly the URI SAN want and the key of pub.
func verifyLeaf(t testing.TB, chain []*x509.Certificate, roots *x509.CertPool, want string, pub crypto.PublicKey) {
	t.Helper()
	inter := x509.NewCertPool()
	for _, c := range chain[1 : len(chain)-1] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("leaf does not verify as a client certificate: %v", err)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
		t.Errorf("leaf does not verify as a server certificate: %v", err)
	}
	var got []string
	for _, u := range chain[0].URIs {
		got = append(got, u.String())
	}
	if len(got) != 1 || got[0] != want || len(chain[0].DNSNames)+len(chain[0].IPAddresses)+len(chain[0].EmailAddresses) != 0 {
		t.Errorf("leaf SANs: URIs %q DNS %q IP %v email %q; want exactly URI %q", got, chain[0].DNSNames, chain[0].IPAddresses, chain[0].EmailAddresses, want)
	}
	if k, ok := pub.(interface{ Equal(crypto.PublicKey) bool }); !ok || !k.Equal(chain[0].PublicKey) {
		t.Error("leaf does not carry the CSR's public key")
	}
	if chain[len(chain)-1].CheckSignatureFrom(chain[len(chain)-1]) != nil {
		t.Error("last certificate of the chain is not the self-signed root")
	}
}

// testPKI is a user's own PKI: a root and an intermediate CA under it.
type testPKI struct {
	root, inter       *x509.Certificate
	rootPEM, interPEM []byte
	interKeyPEM       []byte
}

func newTestPKI(t testing.TB) testPKI {
	t.Helper()
	now := time.Now()
	rootCA, rootPEM, _, err := certs.NewAuthorityFor(now, 24*time.Hour, pkixName("user root"))
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(2),
		Subject:               pkixName("user intermediate"),
		NotBefore:             now.Add(-time.Minute),
		NotAfter:              now.Add(12 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, rootCA.Cert, key.Public(), rootCA.Key)
	if err != nil {
		t.Fatal(err)
	}
	inter, _ := x509.ParseCertificate(der)
	keyPEM, err := certs.EncodeKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return testPKI{root: rootCA.Cert, inter: inter, rootPEM: rootPEM,
		interPEM: certs.EncodeCertificates([]*x509.Certificate{inter}), interKeyPEM: keyPEM}
}

// cacerts returns Istio's plug-in Secret data for the PKI: the intermediate
// signs, cert-chain.pem is intermediate then root.
func (p testPKI) cacerts() map[string][]byte {
	return map[string][]byte{
		KeyCACert:    p.interPEM,
		KeyCAKey:     p.interKeyPEM,
		KeyRootCert:  p.rootPEM,
		KeyCertChain: append(append([]byte{}, p.interPEM...), p.rootPEM...),
	}
}

func spiffe(ns, sa string) string { return fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/%s", ns, sa) }

func pkixName(cn string) pkix.Name {
	return pkix.Name{CommonName: cn, Organization: []string{"meshlet test"}}
}

// csrWithDNS returns a CSR asking for a DNS SAN.
func csrWithDNS(t testing.TB, name string) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{DNSNames: []string{name}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}
