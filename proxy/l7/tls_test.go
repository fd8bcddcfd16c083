package l7

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"crypto/sha512"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	testpb "google.golang.org/grpc/interop/grpc_testing"
	"google.golang.org/grpc/metadata"
)

// testCA is a throwaway certificate authority whose files live in a test's
// TempDir. (webhook/certs issues serving certificates only; these tests
// also need client certificates and URI SANs.)
type testCA struct {
	dir    string
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	pem    string // path of the CA certificate
	pool   *x509.CertPool
	serial atomic.Int64
}

func newTestCA(t testing.TB, name string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: name},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	ca := &testCA{dir: t.TempDir(), cert: cert, key: key, pool: x509.NewCertPool()}
	ca.pool.AddCert(cert)
	ca.serial.Store(1)
	ca.pem = ca.write(t, name+"-ca.pem", "CERTIFICATE", der)
	return ca
}

func (ca *testCA) write(t testing.TB, name, typ string, der []byte) string {
	t.Helper()
	p := filepath.Join(ca.dir, name)
	if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

// leaf is an issued certificate: its files and the loaded pair.
type leaf struct {
	certPath, keyPath string
	pair              tls.Certificate
}

// issue signs a server (or client) certificate for names: DNS names, IP
// addresses and URIs, told apart by their form.
func (ca *testCA) issue(t testing.TB, cn string, client bool, names ...string) leaf {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(ca.serial.Add(1)), Subject: pkix.Name{CommonName: cn},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	if client {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	for _, n := range names {
		if ip := net.ParseIP(n); ip != nil {
			tmpl.IPAddresses = append(tmpl.IPAddresses, ip)
		} else if u, err := url.Parse(n); err == nil && u.Scheme != "" {
			tmpl.URIs = append(tmpl.URIs, u)
		} else {
			tmpl.DNSNames = append(tmpl.DNSNames, n)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, key.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	l := leaf{certPath: ca.write(t, cn+".pem", "CERTIFICATE", der), keyPath: ca.write(t, cn+"-key.pem", "EC PRIVATE KEY", kder)}
	l.pair, err = tls.LoadX509KeyPair(l.certPath, l.keyPath)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// tlsBackend is a real HTTPS server (HTTP/1.1 and HTTP/2 by ALPN) on
// loopback. It reports what it saw of each connection's handshake: the SNI
// (through GetConfigForClient), the negotiated protocol and the client
// certificate.
type tlsBackend struct {
	addr    string
	conns   atomic.Int64 // TCP connections accepted
	closed  atomic.Int64 // and closed
	healthz atomic.Int64 // /healthz requests
	reqs    atomic.Int64 // other requests
	mu      sync.Mutex
	sni     []string
	srv     *http.Server
}

// closeIdle makes the server close its (one) idle connection, as its idle
// timeout would: tls.Conn.Close sends close_notify, then the FIN. The
// connection may not be idle yet right after the response was read.
func (b *tlsBackend) closeIdle(t testing.TB) {
	t.Helper()
	want := b.closed.Load() + 1
	defer b.srv.SetKeepAlivesEnabled(true)
	waitUntil(t, func() bool {
		b.srv.SetKeepAlivesEnabled(false) // closes idle connections
		return b.closed.Load() >= want
	})
}

func (b *tlsBackend) snis() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.sni...)
}

// startTLSBackend serves cert; edit adjusts the server's tls.Config
// (client authentication, versions). h, if not nil, answers instead of the
// default handler (which names the server and echoes the request).
func startTLSBackend(t testing.TB, name string, cert leaf, edit func(*tls.Config), h ...http.HandlerFunc) *tlsBackend {
	t.Helper()
	b := &tlsBackend{}
	cfg := &tls.Config{Certificates: []tls.Certificate{cert.pair}, NextProtos: []string{"h2", "http/1.1"}}
	if edit != nil {
		edit(cfg)
	}
	cfg.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
		b.mu.Lock()
		b.sni = append(b.sni, hello.ServerName)
		b.mu.Unlock()
		return nil, nil
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b.addr = ln.Addr().String()
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetHTTP2(slices.Contains(cfg.NextProtos, "h2"))
	srv := &http.Server{Protocols: &protos, TLSConfig: cfg, IdleTimeout: time.Minute,
		ErrorLog: log.New(io.Discard, "", 0), // refused handshakes are what some tests want
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/healthz" {
				b.healthz.Add(1)
			} else {
				b.reqs.Add(1)
			}
			if len(h) > 0 {
				h[0](w, r)
				return
			}
			body, _ := io.ReadAll(r.Body)
			w.Header().Set("X-Backend", name)
			w.Header().Set("X-Proto", r.Proto)
			w.Header().Set("X-ALPN", r.TLS.NegotiatedProtocol)
			if len(r.TLS.PeerCertificates) > 0 {
				w.Header().Set("X-Client-CN", r.TLS.PeerCertificates[0].Subject.CommonName)
			}
			fmt.Fprintf(w, "%s %s %s %s", name, r.Method, r.URL.Path, body)
		}),
		ConnState: func(_ net.Conn, st http.ConnState) {
			switch st {
			case http.StateNew:
				b.conns.Add(1)
			case http.StateClosed:
				b.closed.Add(1)
			}
		},
	}
	b.srv = srv
	go srv.ServeTLS(ln, "", "")
	t.Cleanup(func() { srv.Close() })
	return b
}

// tlsClusterConfig routes host "api" to cluster "api" with the given
// cluster body (YAML lines indented for a cluster entry).
func tlsClusterConfig(clusterYAML string) string {
	return `
accessLog: {enabled: true}
services:
- name: api
  hosts: [api]
  routes: [{name: r, destinations: [{cluster: api}]}]
clusters:
- name: api
` + clusterYAML
}

// tlsPost sends a small POST (the HTTP/1.1 fast path) through the proxy.
func tlsPost(t testing.TB, c *http.Client, proxyAddr, host, path, body string) (int, http.Header, string) {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, "http://"+proxyAddr+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Host = host
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("POST %s%s: %v", host, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, string(b)
}

// TestTLSSimpleHTTP1FastPath: SIMPLE TLS to an HTTP/1.1 upstream through
// h1Transport; the connection is reused across requests; with no sni the
// endpoint's IP is verified and no SNI is sent.
func TestTLSSimpleHTTP1FastPath(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "ca")
	be := startTLSBackend(t, "api", ca.issue(t, "server", false, "127.0.0.1"), nil)
	tp := startProxy(t, mustLoad(t, tlsClusterConfig(fmt.Sprintf(`  protocol: http1
  endpoints: [{address: %q}]
  tls: {mode: SIMPLE, caCertificates: %q}
`, be.addr, ca.pem))), be.addr, l4.Outbound)
	c := h1Client()
	for i := 0; i < 20; i++ {
		code, h, body := tlsPost(t, c, tp.addr, "api", "/p", fmt.Sprint("m", i))
		if code != 200 || body != fmt.Sprintf("api POST /p m%d", i) || h.Get("X-ALPN") != "http/1.1" || h.Get("X-Proto") != "HTTP/1.1" {
			t.Fatalf("request %d: %d %q alpn=%q proto=%q", i, code, body, h.Get("X-ALPN"), h.Get("X-Proto"))
		}
	}
	if n := be.conns.Load(); n != 1 {
		t.Errorf("upstream accepted %d connections for 20 sequential requests, want 1 (keep-alive reuse)", n)
	}
	if fp, _ := tp.tab.Load().clusters["api"].FastPathPool(be.addr); fp.Idle != 1 {
		t.Errorf("fast path pool holds %d idle connections, want 1 (requests did not use h1Transport)", fp.Idle)
	}
	if s := be.snis(); len(s) != 1 || s[0] != "" {
		t.Errorf("SNI seen by the server %q, want one handshake without SNI", s)
	}
}

// TestTLSH2AndAuto: an http2 cluster negotiates h2 by ALPN (with the
// configured SNI); an auto cluster follows the downstream protocol and
// offers both.
func TestTLSH2AndAuto(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "ca")
	be := startTLSBackend(t, "api", ca.issue(t, "server", false, "api.internal"), nil)
	for _, tc := range []struct {
		proto  string
		client *http.Client
		want   string
	}{
		{"http2", h1Client(), "h2"},
		{"auto", h2cClient(), "h2"},
		{"auto", h1Client(), "http/1.1"},
	} {
		tp := startProxy(t, mustLoad(t, tlsClusterConfig(fmt.Sprintf(`  protocol: %s
  endpoints: [{address: %q}]
  tls: {mode: SIMPLE, caCertificates: %q, sni: api.internal}
`, tc.proto, be.addr, ca.pem))), be.addr, l4.Outbound)
		for i := 0; i < 3; i++ {
			code, h, body := get(t, tc.client, tp.addr, "api", "/h")
			if code != 200 || h.Get("X-ALPN") != tc.want || (tc.want == "h2") != (h.Get("X-Proto") == "HTTP/2.0") {
				t.Fatalf("%s cluster: %d %q alpn=%q proto=%q, want ALPN %s", tc.proto, code, body, h.Get("X-ALPN"), h.Get("X-Proto"), tc.want)
			}
		}
	}
	for _, s := range be.snis() {
		if s != "api.internal" {
			t.Errorf("server saw SNI %q, want api.internal", s)
		}
	}
	// A server that speaks only HTTP/1.1: auto uses it for HTTP/2
	// requests too; http2 cannot agree on a protocol (a handshake failure).
	h1only := startTLSBackend(t, "h1only", ca.issue(t, "h1only", false, "api.internal"), func(c *tls.Config) { c.NextProtos = []string{"http/1.1"} })
	for _, tc := range []struct {
		proto string
		code  int
	}{{"auto", 200}, {"http2", 503}} {
		tp := startProxy(t, mustLoad(t, tlsClusterConfig(fmt.Sprintf(`  protocol: %s
  endpoints: [{address: %q}]
  tls: {mode: SIMPLE, caCertificates: %q, sni: api.internal}
`, tc.proto, h1only.addr, ca.pem))), h1only.addr, l4.Outbound)
		code, h, body := get(t, h2cClient(), tp.addr, "api", "/h")
		if code != tc.code || code == 200 && h.Get("X-ALPN") != "http/1.1" {
			t.Errorf("%s cluster, HTTP/2 request, HTTP/1.1-only server: %d %q alpn=%q, want %d", tc.proto, code, body, h.Get("X-ALPN"), tc.code)
		}
	}
}

// TestTLSGRPC: gRPC through the proxy to a grpc-go server with TLS
// credentials: a unary call and a bidi stream, plus the gRPC health check
// over TLS.
func TestTLSGRPC(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "ca")
	cert := ca.issue(t, "echo", false, "echo.internal")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var sni atomic.Value
	s := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert.pair},
		GetConfigForClient: func(h *tls.ClientHelloInfo) (*tls.Config, error) { sni.Store(h.ServerName); return nil, nil }})))
	es := &echoServer{name: "echo-tls"}
	testpb.RegisterTestServiceServer(s, es)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(s, hs)
	go s.Serve(ln)
	t.Cleanup(s.Stop)
	tp := startProxy(t, mustLoad(t, fmt.Sprintf(`
ports: [{port: 7070, name: grpc-echo}]
services:
- name: echo
  hosts: [echo]
  routes: [{name: r, destinations: [{cluster: echo}]}]
clusters:
- name: echo
  protocol: http2
  endpoints: [{address: %q}]
  tls: {mode: SIMPLE, caCertificates: %q, sni: echo.internal}
  healthCheck: {type: grpc, serviceName: echo, interval: 50ms, timeout: 1s, unhealthyThreshold: 1, healthyThreshold: 1}
`, ln.Addr().String(), ca.pem)), "127.0.0.1:7070", l4.Outbound)
	ep := tp.tab.Load().clusters["echo"].Endpoints()[0]
	hs.SetServingStatus("echo", healthpb.HealthCheckResponse_SERVING)
	client := testpb.NewTestServiceClient(grpcConn(t, tp.addr, "echo"))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var trailer metadata.MD
	resp, err := client.UnaryCall(ctx, &testpb.SimpleRequest{Payload: &testpb.Payload{Body: []byte("hi")}}, grpc.Trailer(&trailer))
	if err != nil || resp.GetUsername() != "echo-tls" || string(resp.GetPayload().GetBody()) != "hi" {
		t.Fatalf("unary over TLS: %v %v", resp, err)
	}
	if got := trailer.Get("x-served-by"); len(got) != 1 || got[0] != "echo-tls" {
		t.Errorf("trailers %v", trailer)
	}
	stream, err := client.FullDuplexCall(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 5; i++ {
		bidiRoundTrip(t, stream, fmt.Sprint("s", i))
	}
	if err := stream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); !errors.Is(err, io.EOF) {
		t.Fatalf("stream end: %v", err)
	}
	if v, _ := sni.Load().(string); v != "echo.internal" {
		t.Errorf("server saw SNI %q", v)
	}
	// The health check speaks gRPC over TLS too (the server accepts nothing else).
	hs.SetServingStatus("echo", healthpb.HealthCheckResponse_NOT_SERVING)
	waitUntil(t, func() bool { return ep.Unhealthy() })
	hs.SetServingStatus("echo", healthpb.HealthCheckResponse_SERVING)
	waitUntil(t, func() bool { return !ep.Unhealthy() })
}

// TestTLSMutual: a server that requires and verifies client certificates
// accepts the MUTUAL cluster and refuses the SIMPLE one, which is a connect
// failure (503, UF, counted) on every upstream path and TLS version. With
// TLS 1.3 the refusal comes after the client's handshake, as an alert on
// the first read.
func TestTLSMutual(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "ca")
	client := ca.issue(t, "meshlet-client", true)
	for _, version := range []uint16{tls.VersionTLS12, tls.VersionTLS13} {
		be := startTLSBackend(t, "api", ca.issue(t, "server", false, "127.0.0.1"), func(c *tls.Config) {
			c.ClientAuth = tls.RequireAndVerifyClientCert
			c.ClientCAs = ca.pool
			c.MaxVersion = version
		})
		for _, proto := range []string{"http1", "http2"} {
			name := fmt.Sprintf("%s/TLS1.%d", proto, version-tls.VersionTLS10)
			mutual := startProxy(t, mustLoad(t, tlsClusterConfig(fmt.Sprintf(`  protocol: %s
  endpoints: [{address: %q}]
  tls: {mode: MUTUAL, caCertificates: %q, clientCertificate: %q, privateKey: %q}
`, proto, be.addr, ca.pem, client.certPath, client.keyPath))), be.addr, l4.Outbound)
			code, h, body := get(t, h1Client(), mutual.addr, "api", "/m")
			if code != 200 || h.Get("X-Client-CN") != "meshlet-client" {
				t.Fatalf("%s MUTUAL: %d %q client CN %q", name, code, body, h.Get("X-Client-CN"))
			}
			simple := startProxy(t, mustLoad(t, tlsClusterConfig(fmt.Sprintf(`  protocol: %s
  endpoints: [{address: %q}]
  tls: {mode: SIMPLE, caCertificates: %q}
`, proto, be.addr, ca.pem))), be.addr, l4.Outbound)
			// GET takes the fast path (http1), a streamed POST net/http's transport.
			code, _, body = get(t, h1Client(), simple.addr, "api", "/s")
			if code != 503 || !strings.Contains(body, "upstream connect error") {
				t.Errorf("%s SIMPLE to a server requiring a client cert: %d %q, want 503 connect error", name, code, body)
			}
			req, _ := http.NewRequest(http.MethodPost, "http://"+simple.addr+"/s", io.MultiReader(strings.NewReader("streamed")))
			req.Host = "api"
			resp, err := h1Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != 503 {
				t.Errorf("%s SIMPLE streamed POST: %d, want 503", name, resp.StatusCode)
			}
			if l := simple.log.String(); strings.Count(l, `"UF"`) != 2 {
				t.Errorf("%s: access log should flag both requests UF:\n%s", name, l)
			}
			if v := float64(simple.m.connFail.WithLabelValues("api").Value()); v != 2 {
				t.Errorf("%s: connect failures %v, want 2", name, v)
			}
			if v := float64(simple.m.tlsFail.WithLabelValues("api").Value()); v != 2 {
				t.Errorf("%s: TLS handshake failures %v, want 2", name, v)
			}
		}
	}
}

// ticketInjector relays TCP connections to a TLS 1.3 server and adds a
// NewSessionTicket to what the server sends, 50ms after the first response
// — a legitimate post-handshake record that arrives while the proxy's
// connection sits idle in its pool. (Go's server sends its only ticket
// before the first response, where the client consumes it with the
// response.) The relay knows the server's application traffic secret from
// the server's key log, so it seals the ticket and re-seals every later
// server record with the shifted sequence number.
type ticketInjector struct {
	addr     string
	conns    atomic.Int64
	injected atomic.Int64
	secrets  sync.Map // client random (hex) → server application traffic secret
	t        testing.TB
}

// newTicketInjector returns the relay and the key log writer for the
// server's tls.Config; start starts relaying to the server.
func newTicketInjector(t testing.TB) (*ticketInjector, io.Writer) {
	d := &ticketInjector{t: t}
	return d, keyLog{d}
}

func (d *ticketInjector) start(upstream string) {
	t := d.t
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	d.addr = ln.Addr().String()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			d.conns.Add(1)
			go d.relay(c, upstream)
		}
	}()
}

// keyLog receives the server's NSS key log lines.
type keyLog struct{ d *ticketInjector }

func (k keyLog) Write(p []byte) (int, error) {
	f := strings.Fields(string(p))
	if len(f) == 3 && f[0] == "SERVER_TRAFFIC_SECRET_0" {
		secret, _ := hex.DecodeString(f[2])
		k.d.secrets.Store(f[1], secret)
	}
	return len(p), nil
}

// readRecord reads one TLS record (header and body).
func readRecord(r io.Reader) ([]byte, error) {
	rec := make([]byte, 5)
	if _, err := io.ReadFull(r, rec); err != nil {
		return nil, err
	}
	n := int(rec[3])<<8 | int(rec[4])
	rec = append(rec, make([]byte, n)...)
	_, err := io.ReadFull(r, rec[5:])
	return rec, err
}

// recordAEAD is one direction's TLS 1.3 record protection (RFC 8446 5.2, 7.3).
type recordAEAD struct {
	aead cipher.AEAD
	iv   []byte
}

func newRecordAEAD(suite uint16, secret []byte) (*recordAEAD, error) {
	h, keyLen := sha256.New, 16
	switch suite {
	case tls.TLS_AES_128_GCM_SHA256:
	case tls.TLS_AES_256_GCM_SHA384:
		h, keyLen = sha512.New384, 32
	default:
		return nil, fmt.Errorf("cipher suite %s not handled by the test relay", tls.CipherSuiteName(suite))
	}
	label := func(l string, n int) []byte {
		l = "tls13 " + l
		info := []byte{byte(n >> 8), byte(n), byte(len(l))}
		info = append(append(info, l...), 0)
		out, err := hkdf.Expand(h, secret, string(info), n)
		if err != nil {
			panic(err)
		}
		return out
	}
	block, err := aes.NewCipher(label("key", keyLen))
	if err != nil {
		return nil, err
	}
	aead, err := cipher.NewGCM(block)
	if err != nil {
		return nil, err
	}
	return &recordAEAD{aead: aead, iv: label("iv", 12)}, nil
}

func (a *recordAEAD) nonce(seq uint64) []byte {
	n := slices.Clone(a.iv)
	for i := 0; i < 8; i++ {
		n[len(n)-1-i] ^= byte(seq >> (8 * i))
	}
	return n
}

func (a *recordAEAD) open(rec []byte, seq uint64) ([]byte, error) {
	return a.aead.Open(nil, a.nonce(seq), rec[5:], rec[:5])
}

func (a *recordAEAD) seal(inner []byte, seq uint64) []byte {
	n := len(inner) + a.aead.Overhead()
	hdr := []byte{23, 3, 3, byte(n >> 8), byte(n)}
	return a.aead.Seal(hdr, a.nonce(seq), inner, hdr)
}

func (d *ticketInjector) relay(c net.Conn, upstream string) {
	defer c.Close()
	s, err := net.Dial("tcp", upstream)
	if err != nil {
		return
	}
	defer s.Close()
	var clientRandom atomic.Value
	go func() {
		for {
			rec, err := readRecord(c)
			if err != nil {
				s.Close()
				return
			}
			if rec[0] == 22 && len(rec) > 43 && rec[5] == 1 { // ClientHello
				clientRandom.Store(hex.EncodeToString(rec[11:43]))
			}
			if _, err := s.Write(rec); err != nil {
				return
			}
		}
	}()
	var suite uint16
	var keys *recordAEAD
	var seqIn, seqOut uint64
	injected, appKeys := false, false
	for {
		rec, err := readRecord(s)
		if err != nil {
			return
		}
		if rec[0] == 22 && len(rec) > 44 && rec[5] == 2 { // ServerHello
			sid := int(rec[43])
			suite = uint16(rec[44+sid])<<8 | uint16(rec[45+sid])
		}
		if keys == nil && rec[0] == 23 {
			cr, _ := clientRandom.Load().(string)
			if secret, ok := d.secrets.Load(cr); ok {
				if keys, err = newRecordAEAD(suite, secret.([]byte)); err != nil {
					d.t.Errorf("relay: %v", err)
					return
				}
			}
		}
		// Handshake-key records come first and do not open with the
		// application key; the first that opens starts the application records.
		var inner []byte
		if keys != nil && rec[0] == 23 {
			inner, err = keys.open(rec, seqIn)
			if err != nil && appKeys {
				d.t.Errorf("relay: opening server record %d: %v", seqIn, err)
				return
			}
			appKeys = appKeys || err == nil
		}
		if inner == nil {
			if _, err := c.Write(rec); err != nil {
				return
			}
			continue
		}
		seqIn++
		if _, err := c.Write(keys.seal(inner, seqOut)); err != nil {
			return
		}
		seqOut++
		if !injected && inner[len(inner)-1] == 23 { // the first response went out
			injected = true
			time.Sleep(50 * time.Millisecond)
			ticket := []byte{4, 0, 0, 0, 0, 0, 0x0e, 0x10, 1, 2, 3, 4, 1, 9, 0, 32}
			ticket = append(ticket, bytes.Repeat([]byte{0xab}, 32)...)
			ticket = append(ticket, 0, 0) // no extensions
			body := len(ticket) - 4
			ticket[1], ticket[2], ticket[3] = byte(body>>16), byte(body>>8), byte(body)
			if _, err := c.Write(keys.seal(append(ticket, 22), seqOut)); err != nil {
				return
			}
			seqOut++
			d.injected.Add(1)
		}
	}
}

// TestTLSFastPathLiveness: h1Transport's check of a pooled TLS connection
// keeps one with a pending TLS 1.3 session ticket (consumed, connection
// reused) and drops one the server closed while idle (close_notify and
// FIN) — a POST after that must not fail.
func TestTLSFastPathLiveness(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "ca")
	t.Run("pending session ticket", func(t *testing.T) {
		t.Parallel()
		var relay *ticketInjector
		be := startTLSBackend(t, "api", ca.issue(t, "server", false, "127.0.0.1"), func(c *tls.Config) {
			c.MinVersion = tls.VersionTLS13
			relay, c.KeyLogWriter = newTicketInjector(t)
		})
		relay.start(be.addr)
		tp := startProxy(t, mustLoad(t, tlsClusterConfig(fmt.Sprintf(`  protocol: http1
  endpoints: [{address: %q}]
  tls: {mode: SIMPLE, caCertificates: %q}
`, relay.addr, ca.pem))), be.addr, l4.Outbound)
		c := h1Client()
		for i := 0; i < 5; i++ {
			if code, _, body := tlsPost(t, c, tp.addr, "api", "/t", "x"); code != 200 {
				t.Fatalf("request %d: %d %q\n%s", i, code, body, tp.log.String())
			}
			if i == 0 {
				time.Sleep(150 * time.Millisecond) // the held ticket arrives on the idle connection
			}
		}
		if n := relay.conns.Load(); n != 1 {
			t.Errorf("%d upstream connections for 5 requests; a pending session ticket made the pool drop a good connection", n)
		}
		if relay.injected.Load() < 1 {
			t.Fatal("relay injected no session ticket (test setup)")
		}
	})
	t.Run("closed while idle", func(t *testing.T) {
		t.Parallel()
		be := startTLSBackend(t, "api", ca.issue(t, "server2", false, "127.0.0.1"), nil)
		tp := startProxy(t, mustLoad(t, tlsClusterConfig(fmt.Sprintf(`  protocol: http1
  endpoints: [{address: %q}]
  tls: {mode: SIMPLE, caCertificates: %q}
`, be.addr, ca.pem))), be.addr, l4.Outbound)
		c := h1Client()
		if code, _, body := tlsPost(t, c, tp.addr, "api", "/a", "one"); code != 200 {
			t.Fatalf("first POST: %d %q", code, body)
		}
		// The upstream closes the idle connection (close_notify, then FIN).
		be.closeIdle(t)
		time.Sleep(100 * time.Millisecond)
		if code, _, body := tlsPost(t, c, tp.addr, "api", "/a", "two"); code != 200 || body != "api POST /a two" {
			t.Fatalf("POST after the upstream closed the pooled connection: %d %q", code, body)
		}
		if n := be.conns.Load(); n != 2 {
			t.Errorf("upstream accepted %d connections, want 2 (the closed one replaced)", n)
		}
	})
}

// TestTLSWebSocket: an HTTP/1.1 upgrade to a TLS cluster (net/http's
// transport, not the fast path) and the bytes after it are encrypted.
func TestTLSWebSocket(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "ca")
	be := startTLSBackend(t, "ws", ca.issue(t, "server", false, "127.0.0.1"), nil, wsEcho)
	tp := startProxy(t, mustLoad(t, tlsClusterConfig(fmt.Sprintf(`  protocol: http1
  endpoints: [{address: %q}]
  tls: {mode: SIMPLE, caCertificates: %q}
`, be.addr, ca.pem))), be.addr, l4.Outbound)
	checkWebSocketEcho(t, tp.addr, "api")
}

// TestTLSMutualSlowFirstResponse: a timeout on the first request of a new
// TLS 1.3 connection to a server that asked for (and accepted) the client
// certificate is a timeout, not a refused handshake.
func TestTLSMutualSlowFirstResponse(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "ca")
	client := ca.issue(t, "meshlet-client", true)
	be := startTLSBackend(t, "api", ca.issue(t, "server", false, "127.0.0.1"), func(c *tls.Config) {
		c.ClientAuth = tls.RequireAndVerifyClientCert
		c.ClientCAs = ca.pool
	}, func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-time.After(2 * time.Second):
		case <-r.Context().Done():
		}
	})
	tp := startProxy(t, mustLoad(t, fmt.Sprintf(`
accessLog: {enabled: true}
services:
- name: api
  hosts: [api]
  routes: [{name: r, timeout: 100ms, destinations: [{cluster: api}]}]
clusters:
- name: api
  endpoints: [{address: %q}]
  tls: {mode: MUTUAL, caCertificates: %q, clientCertificate: %q, privateKey: %q}
`, be.addr, ca.pem, client.certPath, client.keyPath)), be.addr, l4.Outbound)
	for _, c := range []*http.Client{h1Client(), h2cClient()} {
		if code, _, body := get(t, c, tp.addr, "api", "/slow"); code != 504 {
			t.Fatalf("%d %q, want 504", code, body)
		}
	}
	if v := float64(tp.m.tlsFail.WithLabelValues("api").Value()) + float64(tp.m.connFail.WithLabelValues("api").Value()); v != 0 {
		t.Errorf("a slow response counted as %v TLS/connect failures\n%s", v, tp.log.String())
	}
}

// TestTLSVerification: each way the server's certificate can fail
// verification is a connect failure (503, UF, counted as a connect and a
// TLS handshake failure, ejected by consecutiveConnectFailures), and the
// settings that make it pass do.
func TestTLSVerification(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "ca")
	other := newTestCA(t, "other")
	byIP := startTLSBackend(t, "api", ca.issue(t, "ip", false, "127.0.0.1"), nil)
	byName := startTLSBackend(t, "api", ca.issue(t, "named", false, "api.internal", "spiffe://cluster.local/ns/a/sa/api"), nil)
	tls12 := startTLSBackend(t, "api", ca.issue(t, "old", false, "127.0.0.1"), func(c *tls.Config) { c.MaxVersion = tls.VersionTLS12 })
	for _, tc := range []struct {
		name, addr, tls string
		ok              bool
		log             string // in the debug log
	}{
		{"wrong CA", byIP.addr, fmt.Sprintf("{mode: SIMPLE, caCertificates: %q}", other.pem), false, "certificate signed by unknown authority"},
		{"system roots do not know the test CA", byIP.addr, "{mode: SIMPLE}", false, ""},
		{"insecureSkipVerify", byIP.addr, "{mode: SIMPLE, insecureSkipVerify: true}", true, `level=WARN msg="upstream TLS certificates are not verified (insecureSkipVerify)" cluster=api`},
		{"no IP SAN for the endpoint", byName.addr, fmt.Sprintf("{mode: SIMPLE, caCertificates: %q}", ca.pem), false, "doesn't contain any IP SANs"},
		{"sni matches", byName.addr, fmt.Sprintf("{mode: SIMPLE, caCertificates: %q, sni: api.internal}", ca.pem), true, ""},
		{"sni mismatch", byName.addr, fmt.Sprintf("{mode: SIMPLE, caCertificates: %q, sni: web.internal}", ca.pem), false, "not web.internal"},
		{"subjectAltNames replace the sni check", byName.addr, fmt.Sprintf("{mode: SIMPLE, caCertificates: %q, sni: web.internal, subjectAltNames: [spiffe://cluster.local/ns/a/sa/api]}", ca.pem), true, ""},
		{"subjectAltNames DNS", byName.addr, fmt.Sprintf("{mode: SIMPLE, caCertificates: %q, subjectAltNames: [other.internal, api.internal]}", ca.pem), true, ""},
		{"subjectAltNames mismatch", byName.addr, fmt.Sprintf("{mode: SIMPLE, caCertificates: %q, sni: api.internal, subjectAltNames: [spiffe://cluster.local/ns/a/sa/web]}", ca.pem), false,
			"match none of subjectAltNames [spiffe://cluster.local/ns/a/sa/web]"},
		{"subjectAltNames still need the CA", byName.addr, fmt.Sprintf("{mode: SIMPLE, caCertificates: %q, subjectAltNames: [api.internal]}", other.pem), false, ""},
		{"minProtocolVersion", tls12.addr, fmt.Sprintf("{mode: SIMPLE, caCertificates: %q, minProtocolVersion: TLSV1_3}", ca.pem), false, ""},
		{"TLS 1.2 server", tls12.addr, fmt.Sprintf("{mode: SIMPLE, caCertificates: %q}", ca.pem), true, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			logs := &proctest.SyncBuf{}
			tp := startProxy(t, mustLoad(t, tlsClusterConfig(fmt.Sprintf(`  endpoints: [{address: %q}]
  outlierDetection: {consecutiveConnectFailures: 2, maxEjectionPercent: 100}
  tls: %s
`, tc.addr, tc.tls))), tc.addr, l4.Outbound, func(o *Options) {
				o.Logger = slog.New(slog.NewTextHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
			})
			defer func() {
				if !strings.Contains(logs.String(), tc.log) {
					t.Errorf("log lacks %q:\n%s", tc.log, logs.String())
				}
			}()
			for i := 0; i < 2; i++ {
				code, _, body := get(t, h1Client(), tp.addr, "api", "/v")
				if tc.ok != (code == 200) || !tc.ok && (code != 503 || !strings.Contains(body, "upstream connect error")) {
					t.Fatalf("request %d: %d %q, want %s\n%s", i, code, body, map[bool]string{true: "200", false: "503 connect error"}[tc.ok], tp.log.String())
				}
			}
			if tc.ok {
				return
			}
			if n := strings.Count(tp.log.String(), `"flags":"UF"`); n != 2 {
				t.Errorf("%d of 2 requests flagged UF:\n%s", n, tp.log.String())
			}
			if !strings.Contains(tp.log.String(), "TLS handshake with "+tc.addr) {
				t.Errorf("access log error does not name the handshake:\n%s", tp.log.String())
			}
			if want := `level=DEBUG msg="upstream TLS handshake failed" cluster=api endpoint=` + tc.addr + " err="; !strings.Contains(logs.String(), want) {
				t.Errorf("debug log lacks %q:\n%s", want, logs.String())
			}
			if v := float64(tp.m.connFail.WithLabelValues("api").Value()); v != 2 {
				t.Errorf("connect failures %v, want 2", v)
			}
			if v := float64(tp.m.tlsFail.WithLabelValues("api").Value()); v != 2 {
				t.Errorf("TLS handshake failures %v, want 2", v)
			}
			if v := float64(tp.m.ejections.WithLabelValues("api").Value()); v != 1 {
				t.Errorf("ejections %v, want 1 (two consecutive connect failures)", v)
			}
		})
	}
}

// TestTLSRetryOnHandshakeFailure: retryOn connect-failure retries a failed
// handshake on another endpoint.
func TestTLSRetryOnHandshakeFailure(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "ca")
	other := newTestCA(t, "other")
	good := startTLSBackend(t, "good", ca.issue(t, "good", false, "127.0.0.1"), nil)
	bad := startTLSBackend(t, "bad", other.issue(t, "bad", false, "127.0.0.1"), nil)
	tp := startProxy(t, mustLoad(t, fmt.Sprintf(`
services:
- name: api
  hosts: [api]
  routes: [{name: r, retries: {attempts: 2, retryOn: [connect-failure]}, destinations: [{cluster: api}]}]
clusters:
- name: api
  endpoints: [{address: %q}, {address: %q}]
  tls: {mode: SIMPLE, caCertificates: %q}
`, good.addr, bad.addr, ca.pem)), good.addr, l4.Outbound)
	for i := 0; i < 10; i++ {
		if code, h, body := get(t, h1Client(), tp.addr, "api", "/r"); code != 200 || h.Get("X-Backend") != "good" {
			t.Fatalf("request %d: %d %q from %q", i, code, body, h.Get("X-Backend"))
		}
	}
	if f, r := float64(tp.m.tlsFail.WithLabelValues("api").Value()), float64(tp.m.retries.WithLabelValues("api").Value()); f < 1 || r != f {
		t.Errorf("%v TLS handshake failures, %v retries; want some, one retry each", f, r)
	}
}

// TestTLSDNSClusterSNI: a DNS cluster sends its dns.name as SNI and
// verifies the certificate against it, without an sni setting.
func TestTLSDNSClusterSNI(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "ca")
	be := startTLSBackend(t, "api", ca.issue(t, "server", false, "api.example.internal"), nil)
	res := &fakeResolver{}
	res.set("127.0.0.1")
	_, port, _ := net.SplitHostPort(be.addr)
	tp := startProxy(t, mustLoad(t, tlsClusterConfig(fmt.Sprintf(`  dns: {name: api.example.internal, port: %s}
  tls: {mode: SIMPLE, caCertificates: %q}
`, port, ca.pem))), be.addr, l4.Outbound, func(o *Options) { o.Resolver = res })
	if code, _, body := get(t, h1Client(), tp.addr, "api", "/d"); code != 200 {
		t.Fatalf("%d %q\n%s", code, body, tp.log.String())
	}
	if s := be.snis(); len(s) != 1 || s[0] != "api.example.internal" {
		t.Errorf("SNI %q, want [api.example.internal]", s)
	}
}

// TestTLSHealthCheckAndMirror: HTTP health checks and mirrored requests
// reach TLS clusters over TLS.
func TestTLSHealthCheckAndMirror(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "ca")
	other := newTestCA(t, "other")
	good := startTLSBackend(t, "good", ca.issue(t, "good", false, "127.0.0.1"), nil)
	untrusted := startTLSBackend(t, "untrusted", other.issue(t, "untrusted", false, "127.0.0.1"), nil)
	shadow := startTLSBackend(t, "shadow", ca.issue(t, "shadow", false, "127.0.0.1"), nil)
	tp := startProxy(t, mustLoad(t, fmt.Sprintf(`
services:
- name: api
  hosts: [api]
  routes: [{name: r, mirror: {cluster: shadow}, destinations: [{cluster: api}]}]
clusters:
- name: api
  endpoints: [{address: %q}, {address: %q}]
  healthCheck: {path: /healthz, interval: 50ms, unhealthyThreshold: 1}
  tls: {mode: SIMPLE, caCertificates: %q}
- name: shadow
  endpoints: [{address: %q}]
  tls: {mode: SIMPLE, caCertificates: %q}
`, good.addr, untrusted.addr, ca.pem, shadow.addr, ca.pem)), good.addr, l4.Outbound)
	eps := tp.tab.Load().clusters["api"].Endpoints()
	waitUntil(t, func() bool { return eps[1].Unhealthy() && good.healthz.Load() >= 2 })
	if eps[0].Unhealthy() {
		t.Fatal("the endpoint with a trusted certificate failed its health check")
	}
	for i := 0; i < 4; i++ {
		if code, h, body := tlsPost(t, h1Client(), tp.addr, "api", "/m", "copy"); code != 200 || h.Get("X-Backend") != "good" {
			t.Fatalf("request %d: %d %q from %q (the untrusted endpoint is unhealthy)", i, code, body, h.Get("X-Backend"))
		}
	}
	waitUntil(t, func() bool { return shadow.reqs.Load() == 4 })
	if v := float64(tp.m.connFail.WithLabelValues("shadow").Value()); v != 0 {
		t.Errorf("mirror connect failures %v", v)
	}
}

// TestTLSConfigErrors: every bad tls field is reported with its path and
// the bad value, all at once; files are read and checked at load.
func TestTLSConfigErrors(t *testing.T) {
	t.Parallel()
	ca := newTestCA(t, "ca")
	client := ca.issue(t, "client", true)
	other := ca.issue(t, "other", true)
	garbage := filepath.Join(ca.dir, "garbage.pem")
	if err := os.WriteFile(garbage, []byte("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	missing := filepath.Join(ca.dir, "missing.pem")
	cluster := func(tlsYAML string) string {
		return "clusters: [{name: a, endpoints: [{address: '127.0.0.1:443'}], tls: " + tlsYAML + "}]"
	}
	for _, tc := range []struct {
		name, yaml string
		want       []string
	}{
		{"mode", cluster("{mode: simple}"), []string{"clusters[0].tls.mode", `"simple" must be one of DISABLE, SIMPLE, MUTUAL, ISTIO_MUTUAL`}},
		{"istio mutual with files", cluster(fmt.Sprintf("{mode: ISTIO_MUTUAL, caCertificates: %q}", ca.pem)), []string{"clusters[0].tls.caCertificates: is set but mode is ISTIO_MUTUAL"}},
		{"istio mutual DNS SAN", cluster("{mode: ISTIO_MUTUAL, subjectAltNames: [a.example]}"), []string{"clusters[0].tls.subjectAltNames[0]", `"a.example"`, "SPIFFE"}},
		{"autoMTLS without ISTIO_MUTUAL", cluster("{mode: SIMPLE, autoMTLS: true}"), []string{"clusters[0].tls.autoMTLS: needs mode ISTIO_MUTUAL, not SIMPLE"}},
		{"settings without a mode", cluster(fmt.Sprintf("{caCertificates: %q, sni: a.b}", ca.pem)),
			[]string{"clusters[0].tls.caCertificates: is set but mode is DISABLE", "clusters[0].tls.sni: is set but mode is DISABLE"}},
		{"missing CA file", cluster(fmt.Sprintf("{mode: SIMPLE, caCertificates: %q}", missing)),
			[]string{"clusters[0].tls.caCertificates", missing, "no such file or directory"}},
		{"device", cluster("{mode: SIMPLE, caCertificates: /dev/zero}"), []string{"clusters[0].tls.caCertificates", `"/dev/zero"`, "not a regular file"}},
		{"relative path", cluster("{mode: SIMPLE, caCertificates: certs/ca.pem}"), []string{"clusters[0].tls.caCertificates", `"certs/ca.pem" must be an absolute path`}},
		{"CA not PEM", cluster(fmt.Sprintf("{mode: SIMPLE, caCertificates: %q}", client.keyPath)),
			[]string{"clusters[0].tls.caCertificates", client.keyPath, "no PEM CERTIFICATE block found"}},
		{"CA not a certificate", cluster(fmt.Sprintf("{mode: SIMPLE, caCertificates: %q}", garbage)),
			[]string{"clusters[0].tls.caCertificates", garbage, "certificate 1:"}},
		{"mutual without files", cluster("{mode: MUTUAL}"),
			[]string{"clusters[0].tls.clientCertificate: is required for mode MUTUAL", "clusters[0].tls.privateKey: is required for mode MUTUAL"}},
		{"key does not match", cluster(fmt.Sprintf("{mode: MUTUAL, clientCertificate: %q, privateKey: %q}", client.certPath, other.keyPath)),
			[]string{"clusters[0].tls.privateKey", other.keyPath, "does not match clientCertificate", client.certPath}},
		{"key not a key", cluster(fmt.Sprintf("{mode: MUTUAL, clientCertificate: %q, privateKey: %q}", client.certPath, client.certPath)),
			[]string{"clusters[0].tls.privateKey", client.certPath}},
		{"client certificate not a certificate", cluster(fmt.Sprintf("{mode: MUTUAL, clientCertificate: %q, privateKey: %q}", garbage, client.keyPath)),
			[]string{"clusters[0].tls.clientCertificate", garbage}},
		{"client certificate with SIMPLE", cluster(fmt.Sprintf("{mode: SIMPLE, clientCertificate: %q, privateKey: %q}", client.certPath, client.keyPath)),
			[]string{"clusters[0].tls.clientCertificate", client.certPath, "only used with mode MUTUAL (mode is SIMPLE)", "clusters[0].tls.privateKey"}},
		{"sni IP", cluster("{mode: SIMPLE, sni: 10.0.0.1}"), []string{"clusters[0].tls.sni", `"10.0.0.1" is an IP address`}},
		{"sni not a name", cluster("{mode: SIMPLE, sni: 'a b'}"), []string{"clusters[0].tls.sni", `"a b" is not a DNS name`}},
		{"empty SAN", cluster("{mode: SIMPLE, subjectAltNames: [ok.example, '']}"), []string{"clusters[0].tls.subjectAltNames[1]", `"" is not a name`}},
		{"insecure with CA", cluster(fmt.Sprintf("{mode: SIMPLE, insecureSkipVerify: true, caCertificates: %q, subjectAltNames: [a]}", ca.pem)),
			[]string{"clusters[0].tls.insecureSkipVerify: true ignores caCertificates", "clusters[0].tls.insecureSkipVerify: true ignores subjectAltNames"}},
		{"min version", cluster("{mode: SIMPLE, minProtocolVersion: TLSV1_1}"), []string{"clusters[0].tls.minProtocolVersion", `"TLSV1_1" is not supported`}},
		{"min version name", cluster("{mode: SIMPLE, minProtocolVersion: '1.3'}"), []string{"clusters[0].tls.minProtocolVersion", `"1.3" must be TLSV1_2 or TLSV1_3`}},
		{"unknown field", cluster("{mode: SIMPLE, credentialName: x}"), []string{`unknown field "credentialName"`}},
		{"all collected", "clusters: [{name: a, endpoints: [{address: 'nope'}], tls: {mode: MUTUAL, caCertificates: " + missing + ", sni: '1.2.3.4'}}]",
			[]string{"clusters[0].endpoints[0].address", "clusters[0].tls.caCertificates", "clusters[0].tls.clientCertificate", "clusters[0].tls.privateKey", "clusters[0].tls.sni"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := config.ParseL7([]byte(tc.yaml))
			if err == nil {
				t.Fatalf("accepted:\n%s", tc.yaml)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
		})
	}
	// The same checks run in New (a Config built in code, not loaded).
	cfg := config.L7{Clusters: []config.Cluster{{Name: "a", Endpoints: []config.Endpoint{{Address: "127.0.0.1:443"}}, TLS: &config.UpstreamTLS{Mode: config.TLSSimple, CACertificates: missing}}}}
	if _, err := New(cfg, Options{}); err == nil || !strings.Contains(err.Error(), "clusters[0].tls.caCertificates") {
		t.Errorf("New with a missing CA file: %v", err)
	}
	good := mustLoad(t, cluster(fmt.Sprintf("{mode: MUTUAL, caCertificates: %q, clientCertificate: %q, privateKey: %q, sni: a.example, subjectAltNames: [spiffe://x/y], minProtocolVersion: TLSV1_3}",
		ca.pem, client.certPath, client.keyPath)))
	if tl := good.Clusters[0].TLS; tl == nil || tl.Mode != config.TLSMutual || tl.SubjectAltNames[0] != "spiffe://x/y" {
		t.Errorf("parsed %+v", tl)
	}
}

// FuzzUpstreamTLSConfig: no tls block, however odd, panics the loader;
// an accepted one builds.
func FuzzUpstreamTLSConfig(f *testing.F) {
	for _, s := range []string{"{mode: SIMPLE}", "{mode: MUTUAL, clientCertificate: /x, privateKey: /y}", "{sni: a, subjectAltNames: ['']}",
		"{mode: SIMPLE, insecureSkipVerify: true, minProtocolVersion: TLSV1_3}", "{mode: [1]}", "{mode: SIMPLE, caCertificates: /dev/null}"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, tlsYAML string) {
		cfg, err := config.ParseL7([]byte("clusters: [{name: a, endpoints: [{address: '127.0.0.1:443'}], tls: " + tlsYAML + "}]"))
		if err != nil {
			return
		}
		if _, errs := upstream.NewTLS(&cfg.Clusters[0], "tls", nil, nil); len(errs) > 0 {
			t.Fatalf("Load accepted %q but building it failed: %v", tlsYAML, errs)
		}
	})
}
