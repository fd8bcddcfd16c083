// Package identity is the sidecar agent's side of workload identity: it
// creates the workload's private key in memory (ECDSA P-256), asks the mesh
// CA for a certificate with Istio's certificate API
// (istio.v1.auth.IstioCertificateService/CreateCertificate over gRPC+TLS,
// authenticated by the pod's projected service-account token), keeps key and
// chain in memory only, and renews them at about half their lifetime, with
// jitter so that the pods of a rollout do not all renew at once.
//
// The current certificate is offered as tls.Config hooks
// ([Client.GetCertificate], [Client.GetClientCertificate]) and as a value for
// handing over to a proxy generation ([Client.Current]). A generation keeps
// what it was handed in a [Store], which its data path reads per handshake.
// The key is never written to disk and never logged; only serial numbers and
// times are.
package identity

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	mathrand "math/rand/v2"
	"net"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	securityv1alpha1 "istio.io/api/security/v1alpha1"
	"k8s.io/utils/clock"

	"github.com/meshlet/meshlet/internal/certpem"
)

// Istio's paths and defaults, so Istio-style pod specs work unchanged.
const (
	// DefaultTokenFile is where the injector mounts the projected token
	// (audience istio-ca).
	DefaultTokenFile = "/var/run/secrets/tokens/istio-token"
	// DefaultRootCertFile is where the injector mounts the ConfigMap
	// istio-ca-root-cert.
	DefaultRootCertFile = "/var/run/secrets/istio/root-cert.pem"
	// DefaultRenewFraction of a certificate's lifetime after which it is
	// renewed (Istio's grace period ratio).
	DefaultRenewFraction = 0.5
	// DefaultJitter is how far, as a fraction of the lifetime, the renewal
	// point is moved at random either way.
	DefaultJitter = 0.05
)

// Options configure a Client. Zero values mean the documented defaults.
type Options struct {
	// Addr is the CA's host:port (the discovery Service on 15012). Required.
	Addr string
	// ServerName the CA's certificate must carry. Empty means Addr's host.
	ServerName string
	// RootCertFile holds the mesh's roots (the istio-ca-root-cert
	// ConfigMap), which the CA's serving certificate and every issued chain
	// must verify against. It is read at each request: kubelet updates it.
	RootCertFile string
	// TokenFile holds the projected service-account token, read at each
	// request: kubelet rotates it.
	TokenFile string
	// Identity is the SPIFFE ID to ask for (spiffe://td/ns/NS/sa/SA). Empty
	// asks for none: the CA fills in the token's. Either way the issued
	// certificate must carry exactly one URI SAN, and Identity when set.
	Identity string
	// TTL is the lifetime to ask for. Zero leaves it to the CA (24h).
	TTL time.Duration
	// RenewFraction of the lifetime after which the certificate is renewed.
	// Zero means DefaultRenewFraction (0.5).
	RenewFraction float64
	// Jitter moves the renewal point by up to this fraction of the lifetime
	// either way. Zero means DefaultJitter; negative means none.
	Jitter float64
	// Clock drives renewal and retries (tests use a fake). Nil means the
	// real clock.
	Clock clock.WithTicker
	// DialOptions are added to the gRPC dial (tests).
	DialOptions []grpc.DialOption
	// Log receives what the client does (never the key).
	Log logr.Logger
}

// Client obtains and renews the workload certificate.
type Client struct {
	opts    Options
	conn    *grpc.ClientConn
	api     securityv1alpha1.IstioCertificateServiceClient
	current atomic.Pointer[tls.Certificate]
	// anchors are the roots the current certificate was verified against,
	// stored before current.
	anchors atomic.Pointer[[]*x509.Certificate]
	rand    func() float64

	mu      sync.Mutex
	waiters []chan struct{}
	subs    []func(*tls.Certificate)

	// updMu orders the updates subscribers see (a new certificate from
	// Fetch, new roots from RootsChanged), so none goes back in time.
	updMu sync.Mutex
	// renew asks Run to renew now (roots that no longer cover the
	// certificate).
	renew chan struct{}
}

// New checks o and prepares a Client; it does not contact the CA (Run and
// Fetch do).
func New(o Options) (*Client, error) {
	if o.Addr == "" {
		return nil, errors.New("identity: CA address is empty")
	}
	host, _, err := net.SplitHostPort(o.Addr)
	if err != nil {
		return nil, fmt.Errorf("identity: CA address %q: %w", o.Addr, err)
	}
	if o.ServerName == "" {
		o.ServerName = host
	}
	if o.Identity != "" {
		u, err := url.Parse(o.Identity)
		if err != nil || u.Scheme != "spiffe" || u.Host == "" {
			return nil, fmt.Errorf("identity: identity %q is not a SPIFFE ID (spiffe://<trust domain>/ns/<ns>/sa/<sa>)", o.Identity)
		}
	}
	if o.TTL < 0 {
		return nil, fmt.Errorf("identity: certificate lifetime %s is negative", o.TTL)
	}
	if o.RenewFraction == 0 {
		o.RenewFraction = DefaultRenewFraction
	}
	if o.Jitter == 0 {
		o.Jitter = DefaultJitter
	}
	if o.Jitter < 0 {
		o.Jitter = 0
	}
	if o.RenewFraction-o.Jitter <= 0 || o.RenewFraction+o.Jitter >= 1 {
		return nil, fmt.Errorf("identity: renew fraction %.2f with jitter %.2f leaves the window (0, 1)", o.RenewFraction, o.Jitter)
	}
	o.TokenFile = cmpOr(o.TokenFile, DefaultTokenFile)
	o.RootCertFile = cmpOr(o.RootCertFile, DefaultRootCertFile)
	if o.Clock == nil {
		o.Clock = clock.RealClock{}
	}
	c := &Client{opts: o, rand: mathrand.Float64, renew: make(chan struct{}, 1)}
	tlsCfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: o.ServerName,
		// The roots are read per handshake: the ConfigMap changes when the
		// mesh CA does.
		InsecureSkipVerify: true, //nolint:gosec // verified in VerifyConnection against RootCertFile
		VerifyConnection:   c.verifyCA,
	}
	dial := append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg))}, o.DialOptions...)
	conn, err := grpc.NewClient(o.Addr, dial...)
	if err != nil {
		return nil, fmt.Errorf("identity: dialing the CA at %s: %w", o.Addr, err)
	}
	c.conn = conn
	c.api = securityv1alpha1.NewIstioCertificateServiceClient(conn)
	return c, nil
}

func cmpOr(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

// Close releases the connection to the CA.
func (c *Client) Close() error { return c.conn.Close() }

// roots reads the mesh's trust anchors as a pool.
func (c *Client) roots() (*x509.CertPool, error) {
	certs, err := c.rootCerts()
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	for _, r := range certs {
		pool.AddCert(r)
	}
	return pool, nil
}

// rootCerts reads the mesh's trust anchors.
func (c *Client) rootCerts() ([]*x509.Certificate, error) {
	b, err := os.ReadFile(c.opts.RootCertFile)
	if err != nil {
		return nil, fmt.Errorf("reading mesh roots: %w", err)
	}
	certs, err := certpem.ParseCertificates(b)
	if err != nil {
		return nil, fmt.Errorf("mesh roots %s: %w", c.opts.RootCertFile, err)
	}
	if len(certs) == 0 {
		return nil, fmt.Errorf("mesh roots %s: no certificate", c.opts.RootCertFile)
	}
	return certs, nil
}

// verifyCA checks the CA's serving certificate against the mesh roots.
func (c *Client) verifyCA(cs tls.ConnectionState) error {
	pool, err := c.roots()
	if err != nil {
		return err
	}
	if len(cs.PeerCertificates) == 0 {
		return errors.New("CA presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, x := range cs.PeerCertificates[1:] {
		inter.AddCert(x)
	}
	_, err = cs.PeerCertificates[0].Verify(x509.VerifyOptions{
		DNSName: c.opts.ServerName, Roots: pool, Intermediates: inter,
		CurrentTime: c.opts.Clock.Now(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return fmt.Errorf("CA certificate does not verify against %s for %s: %w", c.opts.RootCertFile, c.opts.ServerName, err)
	}
	return nil
}

// Current returns the certificate in use (leaf first, key in memory), or
// nil before the first one arrived.
func (c *Client) Current() *tls.Certificate { return c.current.Load() }

// Roots returns the trust anchors the current certificate was verified
// against (read from RootCertFile when it was obtained), or nil before the
// first one. Subscribers read it for the certificate they were given: it is
// updated before they are called.
func (c *Client) Roots() []*x509.Certificate {
	if r := c.anchors.Load(); r != nil {
		return *r
	}
	return nil
}

// GetCertificate is tls.Config.GetCertificate: the workload certificate for
// inbound mTLS.
func (c *Client) GetCertificate(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	if cur := c.current.Load(); cur != nil {
		return cur, nil
	}
	return nil, errors.New("no workload certificate yet")
}

// GetClientCertificate is tls.Config.GetClientCertificate: the workload
// certificate for outbound mTLS.
func (c *Client) GetClientCertificate(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
	return c.GetCertificate(nil)
}

// Subscribe calls fn with every new certificate (from the goroutine that
// obtained it), starting with the current one if there is one: how the agent
// hands each renewal to its proxy generations.
func (c *Client) Subscribe(fn func(*tls.Certificate)) {
	c.mu.Lock()
	c.subs = append(c.subs, fn)
	cur := c.current.Load()
	c.mu.Unlock()
	if cur != nil {
		fn(cur)
	}
}

// Ready returns a channel closed once a certificate is in use (the proxy
// reports ready only after it).
func (c *Client) Ready() <-chan struct{} {
	ch := make(chan struct{})
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.current.Load() != nil {
		close(ch)
		return ch
	}
	c.waiters = append(c.waiters, ch)
	return ch
}

func (c *Client) store(cert *tls.Certificate) {
	c.mu.Lock()
	c.current.Store(cert)
	waiters, subs := c.waiters, append([]func(*tls.Certificate){}, c.subs...)
	c.waiters = nil
	c.mu.Unlock()
	for _, w := range waiters {
		close(w)
	}
	for _, fn := range subs {
		fn(cert)
	}
}

// Fetch requests one certificate with a new key and puts it in use.
func (c *Client) Fetch(ctx context.Context) (*tls.Certificate, error) {
	token, err := os.ReadFile(c.opts.TokenFile)
	if err != nil {
		return nil, fmt.Errorf("reading service-account token: %w", err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating workload key: %w", err)
	}
	tmpl := &x509.CertificateRequest{}
	if c.opts.Identity != "" {
		u, _ := url.Parse(c.opts.Identity) // checked in New
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return nil, fmt.Errorf("creating CSR: %w", err)
	}
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+string(trimSpace(token)))
	resp, err := c.api.CreateCertificate(ctx, &securityv1alpha1.IstioCertificateRequest{
		Csr:              string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})),
		ValidityDuration: int64(c.opts.TTL / time.Second),
	})
	if err != nil {
		return nil, fmt.Errorf("requesting a certificate from %s: %w", c.opts.Addr, err)
	}
	cert, roots, err := c.check(resp.GetCertChain(), key)
	if err != nil {
		return nil, fmt.Errorf("certificate from %s: %w", c.opts.Addr, err)
	}
	c.updMu.Lock()
	c.anchors.Store(&roots)
	c.store(cert)
	c.updMu.Unlock()
	c.opts.Log.Info("Workload certificate in use", "identity", cert.Leaf.URIs[0].String(), "serial", cert.Leaf.SerialNumber.Text(16),
		"notBefore", cert.Leaf.NotBefore.UTC().Format(time.RFC3339), "notAfter", cert.Leaf.NotAfter.UTC().Format(time.RFC3339))
	return cert, nil
}

func trimSpace(b []byte) []byte {
	for len(b) > 0 && (b[len(b)-1] == '\n' || b[len(b)-1] == '\r' || b[len(b)-1] == ' ') {
		b = b[:len(b)-1]
	}
	return b
}

// check verifies an issued chain: it is for our key, carries exactly one
// URI SAN (ours, if we asked for one) and verifies against the mesh roots,
// which it returns.
func (c *Client) check(chainPEM []string, key crypto.Signer) (*tls.Certificate, []*x509.Certificate, error) {
	var chain []*x509.Certificate
	for i, p := range chainPEM {
		cs, err := certpem.ParseCertificates([]byte(p))
		if err != nil {
			return nil, nil, fmt.Errorf("cert_chain[%d]: %w", i, err)
		}
		chain = append(chain, cs...)
	}
	if len(chain) == 0 {
		return nil, nil, errors.New("empty cert_chain")
	}
	leaf := chain[0]
	if pub, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || !pub.Equal(key.Public()) {
		return nil, nil, errors.New("leaf is not for the key we sent")
	}
	if len(leaf.URIs) != 1 {
		return nil, nil, fmt.Errorf("leaf has %d URI SANs, want one SPIFFE ID", len(leaf.URIs))
	}
	if c.opts.Identity != "" && leaf.URIs[0].String() != c.opts.Identity {
		return nil, nil, fmt.Errorf("leaf is for %s, we asked for %s", leaf.URIs[0], c.opts.Identity)
	}
	anchors, err := c.rootCerts()
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	for _, r := range anchors {
		pool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, x := range chain[1:] {
		inter.AddCert(x)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: c.opts.Clock.Now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}); err != nil {
		return nil, nil, fmt.Errorf("leaf does not verify against %s: %w", c.opts.RootCertFile, err)
	}
	out := &tls.Certificate{PrivateKey: key, Leaf: leaf}
	// Present leaf and intermediates; peers have the root.
	for _, x := range chain {
		if x != leaf && x.CheckSignatureFrom(x) == nil {
			continue
		}
		out.Certificate = append(out.Certificate, x.Raw)
	}
	return out, anchors, nil
}

// renewAt is when cert is renewed: at fraction of its lifetime, moved by up
// to jitter of the lifetime either way (r in [0, 1) picks where).
func renewAt(leaf *x509.Certificate, fraction, jitter, r float64) time.Time {
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	f := fraction + jitter*(2*r-1)
	return leaf.NotBefore.Add(time.Duration(float64(life) * f))
}

// Retry backoff after a failed request: doubling from the first to the cap.
// While the current certificate is valid a retry never waits more than a
// tenth of the time it has left (at least retryFloor); once it has expired,
// never more than retryExpired, so that a CA coming back after a long outage
// is used within seconds.
const (
	retryFirst   = time.Second
	retryMax     = 30 * time.Second
	retryFloor   = 100 * time.Millisecond
	retryExpired = 5 * time.Second
)

// Run obtains the first certificate (retrying with backoff until it
// succeeds or ctx ends) and then renews it before it is due, until ctx ends.
// It returns nil when ctx ends.
func (c *Client) Run(ctx context.Context) error {
	backoff := retryFirst
	for {
		var wait time.Duration
		cert, err := c.Fetch(ctx)
		switch {
		case ctx.Err() != nil:
			return nil
		case err != nil:
			wait = backoff
			if cur := c.current.Load(); cur != nil {
				// Never sleep past expiry: the retry interval is capped
				// by a tenth of the time left.
				if left := cur.Leaf.NotAfter.Sub(c.opts.Clock.Now()); left > 0 {
					wait = max(min(wait, left/10), retryFloor)
				} else {
					wait = min(wait, retryExpired)
				}
			}
			// The next wait doubles this one: a cap that shortened it
			// does not count as time waited.
			backoff = min(2*wait, retryMax)
			c.opts.Log.Error(err, "Obtaining the workload certificate; retrying", "in", wait.String())
		default:
			backoff = retryFirst
			wait = renewAt(cert.Leaf, c.opts.RenewFraction, c.opts.Jitter, c.rand()).Sub(c.opts.Clock.Now())
			c.opts.Log.V(1).Info("Workload certificate renewal scheduled", "in", wait.Round(time.Second).String())
		}
		t := c.opts.Clock.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C():
		case <-c.renew:
			t.Stop()
			backoff = retryFirst
		}
	}
}

// RootsChanged rereads RootCertFile (call it when the file changed: the
// istio-ca-root-cert ConfigMap was updated). Roots that still cover the
// current certificate are put in use and handed to the subscribers with it
// at once, so that peers whose certificates come from a root added for a
// root rotation are trusted before the next renewal. Roots that no longer
// cover it (the mesh CA was replaced) make Run renew at once instead; until
// then the old roots stay. Unreadable roots are logged and ignored.
func (c *Client) RootsChanged() {
	c.updMu.Lock()
	defer c.updMu.Unlock()
	cur := c.current.Load()
	if cur == nil {
		return // the first request reads them
	}
	roots, err := c.rootCerts()
	if err != nil {
		c.opts.Log.Error(err, "Mesh roots changed but cannot be read; keeping the ones in use")
		return
	}
	if sameCerts(roots, c.Roots()) {
		return
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, der := range cur.Certificate[1:] {
		if x, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(x)
		}
	}
	if _, err := cur.Leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, CurrentTime: cur.Leaf.NotBefore,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		c.opts.Log.Info("Mesh roots changed and no longer cover the workload certificate; renewing now", "roots", len(roots))
		select {
		case c.renew <- struct{}{}:
		default:
		}
		return
	}
	c.anchors.Store(&roots)
	c.store(cur)
	c.opts.Log.Info("Mesh roots changed; handed on with the workload certificate", "roots", len(roots))
}

func sameCerts(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(b[i]) {
			return false
		}
	}
	return true
}
