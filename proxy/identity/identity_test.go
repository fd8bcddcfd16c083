package identity

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"github.com/go-logr/logr/testr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	securityv1alpha1 "istio.io/api/security/v1alpha1"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/meshlet/meshlet/webhook/ca"
)

// tokens is the test CA's authenticator: a token is "ns/sa"; it records
// every token it saw and fails while failures > 0.
type tokens struct {
	mu       sync.Mutex
	seen     []string
	failures int
}

func (a *tokens) Authenticate(_ context.Context, token string) (ca.Identity, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.seen = append(a.seen, token)
	if a.failures > 0 {
		a.failures--
		return ca.Identity{}, fmt.Errorf("%w: test CA refuses for now", ca.ErrUnauthenticated)
	}
	ns, sa, ok := strings.Cut(token, "/")
	if !ok {
		return ca.Identity{}, fmt.Errorf("%w: token %q", ca.ErrUnauthenticated, token)
	}
	return ca.Identity{TrustDomain: ca.DefaultTrustDomain, Namespace: ns, ServiceAccount: sa}, nil
}

func (a *tokens) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.seen)
}

// testCA is a real mesh CA (webhook/ca's signer and gRPC service on a
// loopback TLS listener) whose clock is clk; only the TokenReview is replaced
// by tokens.
type testCA struct {
	addr     string
	auth     *tokens
	rootFile string
	dir      string
}

func startTestCA(t *testing.T, clk *clocktesting.FakeClock) *testCA {
	t.Helper()
	data, err := ca.NewSelfSigned(clk.Now(), 10*365*24*time.Hour, ca.DefaultTrustDomain)
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.ParseSecret("test", data, clk.Now())
	if err != nil {
		t.Fatal(err)
	}
	auth := &tokens{}
	srv, err := ca.NewServer(a, ca.ServerOptions{Authenticator: auth, ServingDNSNames: []string{"istiod.istio-system.svc"}, Now: clk.Now, Log: testr.New(t)})
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{GetCertificate: srv.ServingCertificate, MinVersion: tls.VersionTLS12})))
	securityv1alpha1.RegisterIstioCertificateServiceServer(gs, srv)
	go func() { _ = gs.Serve(ln) }()
	t.Cleanup(gs.Stop)
	dir := t.TempDir()
	root := filepath.Join(dir, "root-cert.pem")
	if err := os.WriteFile(root, a.RootPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	return &testCA{addr: ln.Addr().String(), auth: auth, rootFile: root, dir: dir}
}

// client returns a Client of c for service account team-a/reviews.
func (c *testCA) client(t *testing.T, clk *clocktesting.FakeClock, mod func(*Options)) *Client {
	t.Helper()
	token := filepath.Join(c.dir, "istio-token")
	if err := os.WriteFile(token, []byte("team-a/reviews\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	o := Options{Addr: c.addr, ServerName: "istiod.istio-system.svc", RootCertFile: c.rootFile, TokenFile: token, Clock: clk, Log: testr.New(t)}
	if mod != nil {
		mod(&o)
	}
	cl, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

func runClient(t *testing.T, cl *Client) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- cl.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

// eventually polls cond (in real time) for up to 10 s.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// stepTo moves the fake clock to at once the client sleeps on its timer.
func stepTo(t *testing.T, clk *clocktesting.FakeClock, at time.Time) {
	t.Helper()
	eventually(t, "the client waits on its timer", clk.HasWaiters)
	clk.SetTime(at)
}

const wantSPIFFE = "spiffe://cluster.local/ns/team-a/sa/reviews"

// TestRenewsAtHalfLife: the first certificate arrives at once; nothing is
// requested before 45% of its lifetime; by 55% a new certificate with a new
// key is in use, and the next renewal is scheduled from the new one.
func TestRenewsAtHalfLife(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	c := startTestCA(t, clk)
	cl := c.client(t, clk, func(o *Options) { o.TTL = time.Hour })
	runClient(t, cl)
	select {
	case <-cl.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("no certificate")
	}
	first := cl.Current()
	if got := first.Leaf.URIs[0].String(); got != wantSPIFFE {
		t.Fatalf("identity %s, want %s", got, wantSPIFFE)
	}
	life := first.Leaf.NotAfter.Sub(first.Leaf.NotBefore)
	at := func(c *tls.Certificate, f float64) time.Time {
		return c.Leaf.NotBefore.Add(time.Duration(float64(life) * f))
	}
	stepTo(t, clk, at(first, 0.45).Add(-time.Second))
	time.Sleep(50 * time.Millisecond) // a renewal, were one due, would start now
	if n := c.auth.count(); n != 1 || cl.Current() != first {
		t.Fatalf("before 45%% of the lifetime: %d requests, want 1 (no renewal yet)", n)
	}
	stepTo(t, clk, at(first, 0.55).Add(time.Second))
	eventually(t, "renewal by 55% of the lifetime", func() bool { return cl.Current() != first })
	second := cl.Current()
	if c.auth.count() != 2 {
		t.Errorf("%d requests after one renewal, want 2", c.auth.count())
	}
	if second.PrivateKey.(*ecdsa.PrivateKey).Equal(first.PrivateKey) {
		t.Error("renewal kept the old key")
	}
	// The next renewal follows the new certificate's lifetime.
	stepTo(t, clk, at(second, 0.45).Add(-time.Second))
	time.Sleep(50 * time.Millisecond)
	if n := c.auth.count(); n != 2 {
		t.Fatalf("before 45%% of the second lifetime: %d requests, want 2", n)
	}
	stepTo(t, clk, at(second, 0.55).Add(time.Second))
	eventually(t, "second renewal", func() bool { return cl.Current() != second })
}

// TestRetriesWithBackoff: a refused first request is retried after 1 s, then
// 2 s, and the certificate is in use once the CA agrees.
func TestRetriesWithBackoff(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	c := startTestCA(t, clk)
	c.auth.failures = 2
	cl := c.client(t, clk, nil)
	runClient(t, cl)
	start := clk.Now()
	stepTo(t, clk, start.Add(999*time.Millisecond))
	time.Sleep(50 * time.Millisecond)
	if c.auth.count() != 1 {
		t.Fatalf("%d requests before the first retry is due, want 1", c.auth.count())
	}
	stepTo(t, clk, start.Add(time.Second))
	eventually(t, "first retry", func() bool { return c.auth.count() == 2 })
	stepTo(t, clk, start.Add(2999*time.Millisecond))
	time.Sleep(50 * time.Millisecond)
	if c.auth.count() != 2 || cl.Current() != nil {
		t.Fatalf("%d requests before the second retry (1 s + 2 s) is due, want 2", c.auth.count())
	}
	stepTo(t, clk, start.Add(3*time.Second))
	eventually(t, "certificate after the second retry", func() bool { return cl.Current() != nil })
}

// TestTokenReadPerRequest: kubelet rotates the projected token; every request
// sends the file's current content.
func TestTokenReadPerRequest(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	c := startTestCA(t, clk)
	cl := c.client(t, clk, nil)
	if _, err := cl.Fetch(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cl.opts.TokenFile, []byte("team-a/reviews-v2"), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, err := cl.Fetch(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if got := c.auth.seen; len(got) != 2 || got[0] != "team-a/reviews" || got[1] != "team-a/reviews-v2" {
		t.Errorf("tokens sent %q", got)
	}
	if cert.Leaf.URIs[0].String() != "spiffe://cluster.local/ns/team-a/sa/reviews-v2" {
		t.Errorf("identity %s", cert.Leaf.URIs[0])
	}
}

// TestUntrustedCARefused: a CA whose serving certificate does not chain to
// the mounted mesh root gets no token and gives no certificate.
func TestUntrustedCARefused(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	trusted := startTestCA(t, clk)
	impostor := startTestCA(t, clk)
	cl := trusted.client(t, clk, func(o *Options) { o.Addr = impostor.addr })
	_, err := cl.Fetch(context.Background())
	if err == nil || !strings.Contains(err.Error(), "does not verify") {
		t.Fatalf("Fetch from an impostor CA: %v", err)
	}
	if impostor.auth.count() != 0 {
		t.Error("the token reached the impostor")
	}
}

// TestIdentityMismatchRefused: asking for an identity the token does not
// prove fails (the CA refuses; nothing is put in use).
func TestIdentityMismatchRefused(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	c := startTestCA(t, clk)
	cl := c.client(t, clk, func(o *Options) { o.Identity = "spiffe://cluster.local/ns/team-a/sa/ratings" })
	if _, err := cl.Fetch(context.Background()); err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
		t.Fatalf("Fetch: %v, want PermissionDenied", err)
	}
	if cl.Current() != nil {
		t.Error("a certificate is in use after a refusal")
	}
}

// TestMutualTLSWithIssuedCertificates: two clients' certificates authenticate
// a real TLS connection both ways through the tls.Config hooks, each side
// seeing the other's SPIFFE ID.
func TestMutualTLSWithIssuedCertificates(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	c := startTestCA(t, clk)
	server := c.client(t, clk, nil)
	client := c.client(t, clk, nil)
	if err := os.WriteFile(client.opts.TokenFile, []byte("team-b/productpage"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Fetch(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(server.opts.TokenFile, []byte("team-a/reviews"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := server.Fetch(context.Background()); err != nil {
		t.Fatal(err)
	}
	roots, err := server.roots()
	if err != nil {
		t.Fatal(err)
	}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{GetCertificate: server.GetCertificate, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: roots, MinVersion: tls.VersionTLS13})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	peer := make(chan string, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			peer <- err.Error()
			return
		}
		defer conn.Close()
		tc := conn.(*tls.Conn)
		if err := tc.Handshake(); err != nil {
			peer <- err.Error()
			return
		}
		peer <- tc.ConnectionState().PeerCertificates[0].URIs[0].String()
	}()
	conn, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{
		GetClientCertificate: client.GetClientCertificate, RootCAs: roots, MinVersion: tls.VersionTLS13,
		// Mesh peers are named by SPIFFE ID, not DNS: check the URI SAN.
		InsecureSkipVerify: true, //nolint:gosec // verified below
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			leaf, err := x509.ParseCertificate(raw[0])
			if err != nil {
				return err
			}
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots}); err != nil {
				return err
			}
			if leaf.URIs[0].String() != wantSPIFFE {
				return errors.New("wrong server identity " + leaf.URIs[0].String())
			}
			return nil
		},
	})
	if err != nil {
		t.Fatalf("mTLS dial: %v", err)
	}
	conn.Close()
	if got := <-peer; got != "spiffe://cluster.local/ns/team-b/sa/productpage" {
		t.Errorf("server saw client %q", got)
	}
}

// TestKeyNeverLogged: the client's logs at every verbosity name the
// certificate but carry no key material.
func TestKeyNeverLogged(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	c := startTestCA(t, clk)
	var buf bytes.Buffer
	var mu sync.Mutex
	log := funcr.New(func(prefix, args string) {
		mu.Lock()
		defer mu.Unlock()
		buf.WriteString(prefix + args + "\n")
	}, funcr.Options{Verbosity: 10})
	cl := c.client(t, clk, func(o *Options) { o.Log = log })
	cert, err := cl.Fetch(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(cert.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	out := buf.String()
	if !strings.Contains(out, cert.Leaf.SerialNumber.Text(16)) {
		t.Errorf("log does not name the certificate: %s", out)
	}
	for _, bad := range []string{"PRIVATE KEY", fmt.Sprintf("%x", der[len(der)-32:])} {
		if strings.Contains(out, bad) {
			t.Errorf("log carries key material %q", bad)
		}
	}
}

// TestRenewAtWindow: the renewal point lies within fraction ± jitter of the
// lifetime and is spread by the random draw.
func TestRenewAtWindow(t *testing.T) {
	leaf := &x509.Certificate{NotBefore: time.Unix(0, 0), NotAfter: time.Unix(0, 0).Add(100 * time.Hour)}
	for r, want := range map[float64]time.Duration{0: 45 * time.Hour, 0.5: 50 * time.Hour, 1: 55 * time.Hour} {
		if got := renewAt(leaf, 0.5, 0.05, r).Sub(leaf.NotBefore); got != want {
			t.Errorf("renewAt(r=%v) = %s, want %s", r, got, want)
		}
	}
	if got := renewAt(leaf, 0.5, 0, 0.9).Sub(leaf.NotBefore); got != 50*time.Hour {
		t.Errorf("no jitter: %s", got)
	}
}

// TestOptionsRefused: bad options are errors naming the value.
func TestOptionsRefused(t *testing.T) {
	for _, tc := range []struct {
		o        Options
		contains string
	}{
		{Options{}, "address is empty"},
		{Options{Addr: "istiod"}, `"istiod"`},
		{Options{Addr: "a:1", Identity: "https://x"}, "not a SPIFFE ID"},
		{Options{Addr: "a:1", TTL: -time.Second}, "negative"},
		{Options{Addr: "a:1", RenewFraction: 0.98}, "window"},
	} {
		if _, err := New(tc.o); err == nil || !strings.Contains(err.Error(), tc.contains) {
			t.Errorf("New(%+v): %v, want %q", tc.o, err, tc.contains)
		}
	}
}

// TestRetryCappedAfterExpiry: a CA that refuses past the certificate's
// expiry is asked again at least every 5 s, however many attempts failed,
// so a CA that comes back after a long outage is used within seconds.
func TestRetryCappedAfterExpiry(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC))
	c := startTestCA(t, clk)
	cl := c.client(t, clk, func(o *Options) { o.TTL = time.Hour })
	runClient(t, cl)
	eventually(t, "first certificate", func() bool { return cl.Current() != nil })
	c.auth.mu.Lock()
	c.auth.failures = 1000
	c.auth.mu.Unlock()
	now := cl.Current().Leaf.NotAfter.Add(time.Minute)
	stepTo(t, clk, now)
	eventually(t, "renewal attempt past expiry", func() bool { return c.auth.count() == 2 })
	for i := range 8 {
		n := c.auth.count()
		now = now.Add(retryExpired)
		stepTo(t, clk, now)
		eventually(t, fmt.Sprintf("retry %d within %s", i+1, retryExpired), func() bool { return c.auth.count() > n })
	}
}
