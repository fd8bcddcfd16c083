package agent_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	securityv1alpha1 "istio.io/api/security/v1alpha1"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/identity"
	"github.com/meshlet/meshlet/proxy/xds"
	"github.com/meshlet/meshlet/proxy/xds/xdstest"
	"github.com/meshlet/meshlet/webhook/ca"
)

// saTokens is the test CA's authenticator: a token is "ns/sa". Everything
// else about the CA is webhook/ca's own code.
type saTokens struct{}

func (saTokens) Authenticate(_ context.Context, token string) (ca.Identity, error) {
	ns, sa, ok := strings.Cut(token, "/")
	if !ok {
		return ca.Identity{}, fmt.Errorf("%w: token %q", ca.ErrUnauthenticated, token)
	}
	return ca.Identity{TrustDomain: ca.DefaultTrustDomain, Namespace: ns, ServiceAccount: sa}, nil
}

// meshCA is a real mesh CA (webhook/ca's authority and certificate service
// over TLS) on a fixed loopback address, so that it can crash and come back
// where the agent looks for it.
type meshCA struct {
	addr, rootFile, tokenFile string
	srv                       *ca.Server

	mu sync.Mutex
	gs *grpc.Server
}

const caServerName = "istiod.istio-system.svc"

// startMeshCA starts a CA issuing certificates of lifetime ttl.
func startMeshCA(t *testing.T, ttl time.Duration) *meshCA {
	t.Helper()
	now := time.Now()
	data, err := ca.NewSelfSigned(now, 24*time.Hour, ca.DefaultTrustDomain)
	if err != nil {
		t.Fatal(err)
	}
	a, err := ca.ParseSecret("test", data, now)
	if err != nil {
		t.Fatal(err)
	}
	srv, err := ca.NewServer(a, ca.ServerOptions{Authenticator: saTokens{}, DefaultTTL: ttl, ServingDNSNames: []string{caServerName}, Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	c := &meshCA{addr: proctest.FreePort(t), rootFile: filepath.Join(dir, "root-cert.pem"), tokenFile: filepath.Join(dir, "istio-token"), srv: srv}
	if err := os.WriteFile(c.rootFile, a.RootPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(c.tokenFile, []byte("team-a/reviews\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	c.start(t)
	t.Cleanup(c.stop)
	return c
}

// start serves the CA (again) on its address.
func (c *meshCA) start(t *testing.T) {
	t.Helper()
	var ln net.Listener
	var err error
	for range 100 { // the port of a stopped server may take a moment
		if ln, err = net.Listen("tcp", c.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{GetCertificate: c.srv.ServingCertificate, MinVersion: tls.VersionTLS12})))
	securityv1alpha1.RegisterIstioCertificateServiceServer(gs, c.srv)
	go func() { _ = gs.Serve(ln) }()
	c.mu.Lock()
	c.gs = gs
	c.mu.Unlock()
}

// stop crashes the CA: listener and connections close at once.
func (c *meshCA) stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.gs != nil {
		c.gs.Stop()
		c.gs = nil
	}
}

// args are the agent flags that point it at c.
func (c *meshCA) args() []string {
	return []string{"--ca-address", c.addr, "--ca-server-name", caServerName,
		"--ca-token-file", c.tokenFile, "--mesh-root-cert-file", c.rootFile}
}

const wantSPIFFE = "spiffe://cluster.local/ns/team-a/sa/reviews"

// genSerial is the serial of the workload certificate the serving
// generation holds (admin /certs), "" when it holds none.
func (p *proc) genSerial(t *testing.T) string {
	t.Helper()
	code, body := proctest.HTTPGet("http://" + p.admin + "/certs")
	if code != 200 {
		t.Fatalf("admin /certs: %d %s", code, body)
	}
	var certs identity.Certs
	if err := json.Unmarshal([]byte(body), &certs); err != nil {
		t.Fatalf("admin /certs %q: %v", body, err)
	}
	if len(certs.Certificates) == 0 || len(certs.Certificates[0].CertChain) == 0 {
		return ""
	}
	leaf := certs.Certificates[0].CertChain[0]
	if len(leaf.SubjectAltNames) != 1 || leaf.SubjectAltNames[0].URI != wantSPIFFE {
		t.Fatalf("generation's certificate names %+v, want %s", leaf.SubjectAltNames, wantSPIFFE)
	}
	return leaf.SerialNumber
}

// agentSerial is the serial of the certificate the agent last handed out.
func (p *proc) agentSerial(t *testing.T) string {
	t.Helper()
	id := p.info(t).Identity
	if id == nil {
		return ""
	}
	if id.SPIFFE != wantSPIFFE {
		t.Fatalf("agent identity %s, want %s", id.SPIFFE, wantSPIFFE)
	}
	return id.Serial
}

// waitSameSerial waits until the generation holds the certificate the agent
// holds, and returns its serial.
func (p *proc) waitSameSerial(t *testing.T, within time.Duration) string {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		a, g := p.agentSerial(t), p.genSerial(t)
		if a != "" && a == g {
			return a
		}
		if time.Now().After(deadline) {
			t.Fatalf("generation holds %q, agent %q", g, a)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// echoStream opens an echo stream through the outbound listener.
func echoStream(t *testing.T, p *proc) (echo func(what string)) {
	t.Helper()
	c, err := net.Dial("tcp", p.outbound)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := c.Write([]byte("S")); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	return func(what string) {
		t.Helper()
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		msg := []byte("ping " + what)
		if _, err := c.Write(msg); err != nil {
			t.Fatalf("stream %s: %v", what, err)
		}
		got := make([]byte, len(msg))
		if _, err := io.ReadFull(c, got); err != nil {
			t.Fatalf("stream %s: %v", what, err)
		}
	}
}

// TestIdentityRotation: with a CA issuing 4 s certificates, the agent
// starts its generation with the workload certificate, and every renewal
// (about every 2 s) reaches the serving generation without a hot restart
// and without touching an established connection.
func TestIdentityRotation(t *testing.T) {
	t.Parallel()
	c := startMeshCA(t, 4*time.Second)
	p := startAgent(t, httpBackend(t), c.args()...)
	if g := p.genSerial(t); g == "" {
		t.Fatal("generation ready without a workload certificate")
	}
	first := p.waitSameSerial(t, 5*time.Second)
	pid := p.info(t).Generations[0].PID
	echo := echoStream(t, p)
	echo("before rotation")

	seen := map[string]bool{first: true}
	deadline := time.Now().Add(20 * time.Second)
	for len(seen) < 4 {
		if time.Now().After(deadline) {
			t.Fatalf("only %d certificates reached the generation in 20 s", len(seen))
		}
		seen[p.waitSameSerial(t, 5*time.Second)] = true
		time.Sleep(50 * time.Millisecond)
	}
	echo("after three rotations")
	info := p.info(t)
	if info.ActiveGeneration != 1 || len(info.Generations) != 1 || info.Generations[0].PID != pid {
		t.Errorf("rotation restarted the proxy: %+v", info)
	}
	if n := p.metric(t, "meshlet_agent_identity_updates_total"); n < 4 {
		t.Errorf("meshlet_agent_identity_updates_total = %v, want ≥ 4", n)
	}
	if n := p.metric(t, `meshlet_proxy_identity_updates_total{result="success"}`); n < 4 {
		t.Errorf(`meshlet_proxy_identity_updates_total{result="success"} = %v, want ≥ 4`, n)
	}
	if strings.Contains(p.out.String(), "PRIVATE KEY") {
		t.Error("the logs carry a private key")
	}
}

// TestIdentityCADown: a CA that is down delays the sidecar's readiness (no
// generation starts without a certificate); once it is up the proxy starts
// with its certificate. A CA that crashes afterwards never takes the ready
// proxy down, not even past the certificate's expiry; a hot restart while
// it is down gets the identity from the agent before it is ready; when the
// CA is back, renewals resume and reach the new generation.
func TestIdentityCADown(t *testing.T) {
	t.Parallel()
	c := startMeshCA(t, 3*time.Second)
	c.stop()
	backend := httpBackend(t)
	p := launchAgent(t, backend, os.Args[0], c.args()...)
	for until := time.Now().Add(2 * time.Second); time.Now().Before(until); time.Sleep(50 * time.Millisecond) {
		if code, _ := proctest.HTTPGet("http://" + p.st + "/healthz/ready"); code == 200 {
			t.Fatal("sidecar ready without a workload certificate")
		}
	}
	if info := p.info(t); len(info.Generations) != 0 || info.Identity != nil {
		t.Fatalf("without a certificate: %+v", info)
	}

	c.start(t)
	p.waitReady(t)
	p.waitSameSerial(t, 5*time.Second)

	c.stop()
	echo := echoStream(t, p)
	for until := time.Now().Add(5 * time.Second); time.Now().Before(until); time.Sleep(100 * time.Millisecond) {
		if code, body := proctest.HTTPGet("http://" + p.st + "/healthz/ready"); code != 200 {
			t.Fatalf("CA down: readiness %d %s", code, body)
		}
		echo("CA down")
	}
	held := p.agentSerial(t)
	if r := p.reload(t); r.Error != "" || r.Generation != 2 {
		t.Fatalf("hot restart while the CA is down: %+v", r)
	}
	if g := p.waitSameSerial(t, 5*time.Second); g != held {
		t.Fatalf("new generation holds %s, want the agent's %s", g, held)
	}
	if id := p.info(t); id.ActiveGeneration != 2 {
		t.Fatalf("active generation %d, want 2", id.ActiveGeneration)
	}

	c.start(t)
	deadline := time.Now().Add(20 * time.Second)
	for p.waitSameSerial(t, 5*time.Second) == held {
		if time.Now().After(deadline) {
			t.Fatal("no renewal reached the new generation after the CA came back")
		}
		time.Sleep(50 * time.Millisecond)
	}
	echo("CA back")
}

// TestIdentityOff: without a CA address nothing changes: the generation
// starts at once, the agent reports no identity and /certs is empty.
func TestIdentityOff(t *testing.T) {
	t.Parallel()
	p := startAgent(t, httpBackend(t))
	if id := p.info(t).Identity; id != nil {
		t.Errorf("identity without a CA: %+v", id)
	}
	if g := p.genSerial(t); g != "" {
		t.Errorf("generation holds certificate %s without a CA", g)
	}
}

// TestIdentityXDSOverTLS: the generation's xDS client dials the discovery
// server over TLS with the workload certificate the agent handed it: a real
// go-control-plane server that demands a client certificate of the mesh CA
// and serves only over TLS configures the proxy (ready, real HTTP routed by
// the xDS routes), and the server saw the workload's SPIFFE ID.
func TestIdentityXDSOverTLS(t *testing.T) {
	t.Parallel()
	c := startMeshCA(t, time.Hour)
	roots := x509.NewCertPool()
	for _, r := range c.srv.Authority().Roots() {
		roots.AddCert(r)
	}
	var peersMu sync.Mutex
	var peers []string
	record := func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		if p, ok := peer.FromContext(ss.Context()); ok {
			if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.VerifiedChains) > 0 {
				peersMu.Lock()
				peers = append(peers, ti.State.VerifiedChains[0][0].URIs[0].String())
				peersMu.Unlock()
			}
		}
		return h(srv, ss)
	}
	env := map[string]string{"POD_NAME": "reviews-0", "POD_NAMESPACE": "team-a", "INSTANCE_IP": "127.0.0.1", "SERVICE_ACCOUNT": "reviews"}
	id, err := xds.IdentityFromEnv(func(k string) string { return env[k] }, nil)
	if err != nil {
		t.Fatal(err)
	}
	srv := xdstest.StartServerWith(t, "", id.NodeID(),
		grpc.Creds(credentials.NewTLS(&tls.Config{GetCertificate: c.srv.ServingCertificate, MinVersion: tls.VersionTLS12,
			ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: roots})),
		grpc.StreamInterceptor(record))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	backend := serveBackend(t, ln)
	m := xdstest.Mesh{Host: "ratings.team-a.svc.cluster.local", Port: 9080, VIP: "127.0.0.78",
		Subsets: map[string][]string{"v1": {backend}}, Weights: map[string]uint32{"v1": 100}}
	srv.Set(t, "1", m.Resources())

	var envList []string
	for k, v := range env {
		envList = append(envList, k+"="+v)
	}
	args := append(c.args(), "--proxy-arg=--discovery-address="+srv.Addr, "--proxy-arg=--xds-tls=on",
		"--proxy-arg=--xds-server-name="+caServerName, "--proxy-arg=--xds-state-file=")
	p := launchAgentEnv(t, "127.0.0.78:9080", os.Args[0], envList, args...)
	p.waitReady(t)

	hc := &http.Client{Timeout: 3 * time.Second}
	req, _ := http.NewRequest(http.MethodGet, "http://"+p.outbound+"/", nil)
	req.Host = "ratings.team-a.svc.cluster.local:9080"
	resp, err := hc.Do(req)
	if err != nil {
		t.Fatalf("request through the xDS route: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != 200 {
		t.Fatalf("request through the xDS route: %s", resp.Status)
	}
	peersMu.Lock()
	defer peersMu.Unlock()
	if len(peers) == 0 || peers[0] != wantSPIFFE {
		t.Errorf("discovery server saw client identities %v, want %s", peers, wantSPIFFE)
	}
}

// genRoots is the number of mesh roots the serving generation trusts
// (admin /certs ca_cert).
func (p *proc) genRoots(t *testing.T) int {
	t.Helper()
	_, body := proctest.HTTPGet("http://" + p.admin + "/certs")
	var certs identity.Certs
	if err := json.Unmarshal([]byte(body), &certs); err != nil || len(certs.Certificates) == 0 {
		t.Fatalf("admin /certs %q: %v", body, err)
	}
	return len(certs.Certificates[0].CACert)
}

// TestIdentityRootsChange: a root added to the mesh roots file (the first
// step of a root rotation) reaches the serving generation at once, with the
// same certificate and without a restart; roots that no longer cover the
// certificate make the agent renew instead and are not handed on.
func TestIdentityRootsChange(t *testing.T) {
	t.Parallel()
	c := startMeshCA(t, time.Hour)
	p := startAgent(t, httpBackend(t), c.args()...)
	serial := p.waitSameSerial(t, 5*time.Second)
	if n := p.genRoots(t); n != 1 {
		t.Fatalf("generation trusts %d roots, want the mesh root", n)
	}
	other, err := ca.NewSelfSigned(time.Now(), time.Hour, ca.DefaultTrustDomain)
	if err != nil {
		t.Fatal(err)
	}
	orig, err := os.ReadFile(c.rootFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(c.rootFile, append(append([]byte{}, orig...), other["ca-cert.pem"]...), 0o600); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for p.genRoots(t) != 2 {
		if time.Now().After(deadline) {
			t.Fatal("the added root did not reach the generation")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := p.genSerial(t); got != serial {
		t.Errorf("certificate changed from %s to %s for a root change", serial, got)
	}
	if info := p.info(t); info.ActiveGeneration != 1 || len(info.Generations) != 1 {
		t.Errorf("a root change restarted the proxy: %+v", info)
	}

	if err := os.WriteFile(c.rootFile, other["ca-cert.pem"], 0o600); err != nil {
		t.Fatal(err)
	}
	deadline = time.Now().Add(10 * time.Second)
	for !strings.Contains(p.out.String(), "no longer cover the workload certificate; renewing now") {
		if time.Now().After(deadline) {
			t.Fatal("roots without the mesh root did not make the agent renew")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := p.genRoots(t); n != 2 {
		t.Errorf("generation trusts %d roots after a file without its own root, want the 2 it had", n)
	}
}
