package l7_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/identity"
	"github.com/meshlet/meshlet/proxy/l7"
	"github.com/meshlet/meshlet/proxy/mtls"
	"github.com/meshlet/meshlet/proxy/mtls/mtlstest"
	"github.com/meshlet/meshlet/proxy/rbac"
	"github.com/meshlet/meshlet/proxy/server"
	"github.com/meshlet/meshlet/proxy/stats"
)

// sidecar is one workload's proxy as a generation runs it: the generation
// server with real inbound and outbound listeners, the l4 seam and the
// engine, with a workload identity. Inbound connections go to app;
// outbound ones have the original destination 10.0.0.1:80 (a VIP).
type sidecar struct {
	in, out string // listener addresses
	engine  *l7.Engine
	id      *identity.Store
	stats   *stats.Region
	log     *proctest.SyncBuf
}

func startSidecar(t testing.TB, cfg config.L7, id *identity.Store, app string) *sidecar {
	t.Helper()
	cfg.AccessLog.Enabled = true
	return startSidecarLog(t, cfg, id, app)
}

// startSidecarLog is startSidecar with the access log as cfg has it.
func startSidecarLog(t testing.TB, cfg config.L7, id *identity.Store, app string) *sidecar {
	t.Helper()
	sc := &sidecar{id: id, stats: stats.NewPrivate(), log: &proctest.SyncBuf{}}
	p, err := l7.New(cfg, l7.Options{AccessLog: sc.log, Identity: id, Stats: sc.stats})
	if err != nil {
		t.Fatal(err)
	}
	sc.engine = p
	inLn, _ := net.Listen("tcp", "127.0.0.1:0")
	outLn, _ := net.Listen("tcp", "127.0.0.1:0")
	sc.in, sc.out = inLn.Addr().String(), outLn.Addr().String()
	var appDst netip.AddrPort
	if app != "" {
		appDst = netip.MustParseAddrPort(app)
	}
	vip := netip.MustParseAddrPort("10.0.0.1:80")
	var choose func(*l4ConnAlias) l4HandlerAlias
	srv, err := server.New(server.Options{
		Config:    config.Default(),
		Stats:     sc.stats,
		Listeners: server.Listeners{Inbound: []*net.TCPListener{inLn.(*net.TCPListener)}, Outbound: []*net.TCPListener{outLn.(*net.TCPListener)}},
		OrigDst: func(c *net.TCPConn) (netip.AddrPort, error) {
			if c.LocalAddr().String() == sc.in {
				return appDst, nil
			}
			return vip, nil
		},
		Chooser: func(c *l4ConnAlias) l4HandlerAlias { return choose(c) },
	})
	if err != nil {
		t.Fatal(err)
	}
	choose = p.Chooser(srv.Forwarder())
	srv.Start()
	t.Cleanup(func() { srv.Close(); p.Close() })
	return sc
}

// clientConfig routes every host to cluster api: the server sidecar's
// inbound listener as a meshed endpoint, automatic mutual TLS expecting
// sans.
func clientConfig(server *sidecar, proto string, sans ...string) config.L7 {
	return config.L7{
		Services: []config.Service{{Name: "api", Hosts: []string{"*"}, Routes: []config.Route{{Name: "r", Destinations: []config.Destination{{Cluster: "api"}}}}}},
		Clusters: []config.Cluster{{Name: "api", Protocol: proto,
			Endpoints: []config.Endpoint{{Address: server.in, TLSMode: config.EndpointTLSIstio}},
			TLS:       &config.UpstreamTLS{Mode: config.TLSIstioMutual, AutoMTLS: true, SubjectAltNames: sans}}},
	}
}

func serverConfig(mode string) config.L7 {
	return config.L7{Inbound: config.InboundPolicy{MTLS: &config.InboundMTLS{Mode: mode}}}
}

// echoApp answers with the caller's XFCC header and protocol.
func echoApp(t testing.TB) string {
	t.Helper()
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	srv := &http.Server{Protocols: &protos, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "%s xfcc=%s", r.Proto, r.Header.Get("X-Forwarded-Client-Cert"))
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}

func get(t *testing.T, via string, hdr map[string]string) (int, string, error) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+via+"/x", nil)
	req.Host = "api.shop"
	for k, v := range hdr {
		req.Header.Set(k, v)
	}
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), nil
}

func xfccOf(by string, client *identity.Store) string {
	sum := sha256.Sum256(client.Certificate().Leaf.Raw)
	return "By=" + by + ";Hash=" + hex.EncodeToString(sum[:]) + ";URI=" + client.Identity()
}

func stores(t testing.TB, ca *mtlstest.CA) (srv, cli *identity.Store) {
	srv, cli = &identity.Store{}, &identity.Store{}
	srv.Set(ca.Issue(t, "shop", "api"), ca.Roots())
	cli.Set(ca.Issue(t, "front", "web"), ca.Roots())
	return srv, cli
}

var (
	apiID = mtlstest.SPIFFE("shop", "api")
	webID = mtlstest.SPIFFE("front", "web")
)

// TestMTLSHTTP: HTTP/1.1 and HTTP/2 between two sidecars over mutual TLS
// with certificates of the mesh CA; the application sees Istio's XFCC (a
// client-supplied one is replaced), the access log names the peer; a
// STRICT port refuses plain text.
func TestMTLSHTTP(t *testing.T) {
	ca := mtlstest.NewCA(t)
	srvID, cliID := stores(t, ca)
	app := echoApp(t)
	s := startSidecar(t, serverConfig(config.PeerStrict), srvID, app)
	for _, proto := range []string{clusterHTTP1, config.ProtoHTTP2} {
		c := startSidecar(t, clientConfig(s, proto, apiID), cliID, "")
		code, body, err := get(t, c.out, map[string]string{"X-Forwarded-Client-Cert": "By=forged;URI=spiffe://evil"})
		wantProto := map[string]string{clusterHTTP1: "HTTP/1.1", config.ProtoHTTP2: "HTTP/2.0"}[proto]
		if want := wantProto + " xfcc=" + xfccOf(apiID, cliID); err != nil || code != 200 || body != want {
			t.Fatalf("%s through two sidecars: %d %q %v\nwant %q", proto, code, body, err, want)
		}
	}
	if v := s.stats.Counter(`meshlet_mtls_inbound_connections_total{mode="STRICT",result="mtls"}`).Value(); v == 0 {
		t.Error("no mutual TLS connection counted on the server sidecar")
	}
	if !strings.Contains(s.log.String(), `"downstream_peer_principal":"`+webID+`"`) {
		t.Errorf("server access log lacks the peer principal:\n%s", s.log.String())
	}
	// Plain text straight to the STRICT port: closed without an answer.
	if code, body, err := get(t, s.in, nil); err == nil {
		t.Fatalf("plain text on STRICT: %d %q", code, body)
	}
	if v := s.stats.Counter(`meshlet_mtls_inbound_connections_total{mode="STRICT",result="refused_plaintext"}`).Value(); v != 1 {
		t.Errorf("refused plain text counted %d, want 1", v)
	}
}

// TestMTLSPermissive: one PERMISSIVE port serves mutual TLS (XFCC set)
// and plain text (no XFCC; a client's own is removed).
func TestMTLSPermissive(t *testing.T) {
	ca := mtlstest.NewCA(t)
	srvID, cliID := stores(t, ca)
	s := startSidecar(t, serverConfig(config.PeerPermissive), srvID, echoApp(t))
	c := startSidecar(t, clientConfig(s, clusterHTTP1, apiID), cliID, "")
	if code, body, err := get(t, c.out, nil); err != nil || code != 200 || body != "HTTP/1.1 xfcc="+xfccOf(apiID, cliID) {
		t.Fatalf("mTLS on PERMISSIVE: %d %q %v", code, body, err)
	}
	if code, body, err := get(t, s.in, map[string]string{"X-Forwarded-Client-Cert": "By=forged"}); err != nil || code != 200 || body != "HTTP/1.1 xfcc=" {
		t.Fatalf("plain text on PERMISSIVE: %d %q %v", code, body, err)
	}
}

// TestMTLSStrictAppliesToOpenConnections: plain-text keep-alive
// connections opened while a port was PERMISSIVE are refused at their next
// request once the port is STRICT — HTTP/1.1 (the connection closed
// without an answer, counted as refused_plaintext) and HTTP/2 (no answer
// on the old connection, and a new one is refused at accept) — while
// mutual TLS through the client's sidecar keeps being served.
func TestMTLSStrictAppliesToOpenConnections(t *testing.T) {
	ca := mtlstest.NewCA(t)
	srvID, cliID := stores(t, ca)
	s := startSidecar(t, serverConfig(config.PeerPermissive), srvID, echoApp(t))
	c := startSidecar(t, clientConfig(s, clusterHTTP1, apiID), cliID, "")
	refused := func() uint64 {
		return s.stats.Counter(`meshlet_mtls_inbound_connections_total{mode="STRICT",result="refused_plaintext"}`).Value()
	}

	// HTTP/1.1 on one raw connection, so nothing retries behind the test.
	h1, err := net.Dial("tcp", s.in)
	if err != nil {
		t.Fatal(err)
	}
	defer h1.Close()
	br := bufio.NewReader(h1)
	h1Get := func() (*http.Response, string, error) {
		_ = h1.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := io.WriteString(h1, "GET /x HTTP/1.1\r\nHost: api.shop\r\n\r\n"); err != nil {
			return nil, "", err
		}
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			return nil, "", err
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		return resp, string(b), err
	}
	if resp, body, err := h1Get(); err != nil || resp.StatusCode != 200 || body != "HTTP/1.1 xfcc=" {
		t.Fatalf("HTTP/1.1 plain text on PERMISSIVE: %v %q %v", resp, body, err)
	}

	// HTTP/2 with prior knowledge, kept alive; the dials are counted.
	var protos http.Protocols
	protos.SetUnencryptedHTTP2(true)
	var dials atomic.Int32
	h2c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{Protocols: &protos,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			dials.Add(1)
			return (&net.Dialer{}).DialContext(ctx, network, addr)
		}}}
	defer h2c.CloseIdleConnections()
	h2Get := func() (int, string, error) {
		resp, err := h2c.Get("http://" + s.in + "/x")
		if err != nil {
			return 0, "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b), err
	}
	for i := 0; i < 2; i++ {
		if code, body, err := h2Get(); err != nil || code != 200 || body != "HTTP/2.0 xfcc=" {
			t.Fatalf("HTTP/2 plain text on PERMISSIVE: %d %q %v", code, body, err)
		}
	}
	if n := dials.Load(); n != 1 {
		t.Fatalf("HTTP/2 client dialled %d times for two calls, want one kept-alive connection", n)
	}

	if err := s.engine.Update(serverConfig(config.PeerStrict)); err != nil {
		t.Fatal(err)
	}
	before := refused()
	if resp, body, err := h1Get(); err == nil {
		t.Errorf("HTTP/1.1 request on a plain-text connection opened before STRICT: %s %q, want the connection closed unanswered", resp.Status, body)
	} else if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("HTTP/1.1 request on the old connection: %v, want it closed", err)
	}
	if d := refused() - before; d != 1 {
		t.Errorf("refused_plaintext grew by %d for the old HTTP/1.1 connection, want 1", d)
	}
	if code, body, err := h2Get(); err == nil {
		t.Errorf("HTTP/2 request on a plain-text connection opened before STRICT: %d %q, want refused", code, body)
	}
	if d := refused() - before; d < 2 || d > 3 {
		t.Errorf("refused_plaintext grew by %d after the HTTP/2 request too, want 2 or 3 (the old connection's stream, and the client's retry of a refused stream on a new connection)", d)
	}
	// Mutual TLS is served as before.
	if code, body, err := get(t, c.out, nil); err != nil || code != 200 || body != "HTTP/1.1 xfcc="+xfccOf(apiID, cliID) {
		t.Fatalf("mutual TLS after STRICT: %d %q %v", code, body, err)
	}
}

// TestMTLSWrongSAN: a client whose cluster expects another service
// account refuses the server (503, counted, logged); a non-meshed endpoint
// of the same cluster is reached in plain text.
func TestMTLSWrongSAN(t *testing.T) {
	ca := mtlstest.NewCA(t)
	srvID, cliID := stores(t, ca)
	s := startSidecar(t, serverConfig(config.PeerPermissive), srvID, echoApp(t))
	c := startSidecar(t, clientConfig(s, clusterHTTP1, mtlstest.SPIFFE("shop", "billing")), cliID, "")
	code, body, err := get(t, c.out, nil)
	if err != nil || code != http.StatusServiceUnavailable {
		t.Fatalf("wrong SAN: %d %q %v, want 503", code, body, err)
	}
	if !strings.Contains(c.log.String(), `"flags":"UF"`) {
		t.Errorf("client access log lacks UF:\n%s", c.log.String())
	}
	if v := c.stats.Counter(`meshlet_l7_upstream_tls_handshake_failures_total{cluster="api"}`).Value(); v == 0 {
		t.Error("the refused peer identity is not counted as a TLS handshake failure")
	}
	// The same cluster with the endpoint not meshed: plain text, no XFCC.
	cfg := clientConfig(s, clusterHTTP1, mtlstest.SPIFFE("shop", "billing"))
	cfg.Clusters[0].Endpoints[0].TLSMode = ""
	if err := c.engine.Update(cfg); err != nil {
		t.Fatal(err)
	}
	if code, body, err := get(t, c.out, nil); err != nil || code != 200 || body != "HTTP/1.1 xfcc=" {
		t.Fatalf("non-meshed endpoint: %d %q %v", code, body, err)
	}
}

// TestMTLSNoIdentity: a server sidecar without a certificate yet refuses
// mutual TLS (the client sees 503) and keeps serving plain text on
// PERMISSIVE; once the certificate is set, mutual TLS works.
func TestMTLSNoIdentity(t *testing.T) {
	ca := mtlstest.NewCA(t)
	_, cliID := stores(t, ca)
	srvID := &identity.Store{}
	s := startSidecar(t, serverConfig(config.PeerPermissive), srvID, echoApp(t))
	c := startSidecar(t, clientConfig(s, clusterHTTP1, apiID), cliID, "")
	if code, _, err := get(t, c.out, nil); err != nil || code != http.StatusServiceUnavailable {
		t.Fatalf("server without identity: %d %v, want 503", code, err)
	}
	if code, _, err := get(t, s.in, nil); err != nil || code != 200 {
		t.Fatalf("plain text without identity: %d %v", code, err)
	}
	srvID.Set(ca.Issue(t, "shop", "api"), ca.Roots())
	if code, body, err := get(t, c.out, nil); err != nil || code != 200 || !strings.Contains(body, "URI="+webID) {
		t.Fatalf("after Set: %d %q %v", code, body, err)
	}
}

// TestMTLSGRPC: a gRPC call through two sidecars over mutual TLS.
func TestMTLSGRPC(t *testing.T) {
	ca := mtlstest.NewCA(t)
	srvID, cliID := stores(t, ca)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	gs := grpc.NewServer()
	healthpb.RegisterHealthServer(gs, health.NewServer())
	go gs.Serve(ln)
	t.Cleanup(gs.Stop)
	s := startSidecar(t, serverConfig(config.PeerStrict), srvID, ln.Addr().String())
	c := startSidecar(t, clientConfig(s, config.ProtoHTTP2, apiID), cliID, "")
	conn, err := grpc.NewClient(c.out, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority("api.shop"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("gRPC through two sidecars: %v %v", resp, err)
	}
	if v := s.stats.Counter(`meshlet_mtls_inbound_connections_total{mode="STRICT",result="mtls"}`).Value(); v == 0 {
		t.Error("the call did not arrive over mutual TLS")
	}
}

// TestMTLSTCP: opaque TCP on a STRICT port: a client sidecar's mutual TLS
// (ALPN istio) is terminated and relayed to the application; plain text is
// refused.
func TestMTLSTCP(t *testing.T) {
	ca := mtlstest.NewCA(t)
	srvID, cliID := stores(t, ca)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				line, _ := bufio.NewReader(c).ReadString('\n')
				io.WriteString(c, "echo "+line)
			}()
		}
	}()
	cfg := serverConfig(config.PeerStrict)
	cfg.Ports = []config.PortConfig{{Port: netip.MustParseAddrPort(ln.Addr().String()).Port(), Protocol: config.ProtoTCP}}
	s := startSidecar(t, cfg, srvID, ln.Addr().String())
	raw, err := net.Dial("tcp", s.in)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(5 * time.Second))
	tc, err := mtls.Dial(context.Background(), raw, mtls.ClientConfig(cliID, []string{apiID}, mtls.ClientTCP, ""))
	if err != nil {
		t.Fatal(err)
	}
	io.WriteString(tc, "ping\n")
	if line, err := bufio.NewReader(tc).ReadString('\n'); err != nil || line != "echo ping\n" {
		t.Fatalf("TCP over mTLS: %q %v", line, err)
	}
	plain, _ := net.Dial("tcp", s.in)
	defer plain.Close()
	_ = plain.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(plain, "ping\n")
	if b, _ := io.ReadAll(plain); len(b) != 0 {
		t.Fatalf("plain TCP on STRICT answered %q", b)
	}
}

// TestMTLSAuthorizationPrincipal: an ALLOW policy on the caller's
// principal (compiled by proxy/rbac, as the xDS client does) lets the
// right caller through and denies another service account, whose
// certificate is just as valid.
func TestMTLSAuthorizationPrincipal(t *testing.T) {
	ca := mtlstest.NewCA(t)
	srvID, cliID := stores(t, ca)
	other := &identity.Store{}
	other.Set(ca.Issue(t, "front", "batch"), ca.Roots())
	allow, err := rbac.CompileHTTP(&rbachttpv3.RBAC{Rules: &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{
		"ns[shop]-policy[web-only]-rule[0]": {
			Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Any{Any: true}}},
			Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{
				PrincipalName: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: webID}}}}}},
		}}}})
	if err != nil {
		t.Fatal(err)
	}
	cfg := serverConfig(config.PeerPermissive)
	cfg.Inbound.Authorize = func(r *http.Request, dst netip.AddrPort) (bool, string) {
		a := rbac.HTTPAttributes(r, dst)
		d := allow.Evaluate(&a)
		return d.Allowed, d.Policy
	}
	s := startSidecar(t, cfg, srvID, echoApp(t))
	web := startSidecar(t, clientConfig(s, clusterHTTP1, apiID), cliID, "")
	batch := startSidecar(t, clientConfig(s, config.ProtoHTTP2, apiID), other, "")
	if code, _, err := get(t, web.out, nil); err != nil || code != 200 {
		t.Fatalf("allowed principal: %d %v", code, err)
	}
	if code, body, err := get(t, batch.out, nil); err != nil || code != http.StatusForbidden || body != "RBAC: access denied" {
		t.Fatalf("other principal: %d %q %v, want 403", code, body, err)
	}
	if code, _, err := get(t, s.in, nil); err != nil || code != http.StatusForbidden {
		t.Fatalf("plain text (no principal): %d %v, want 403", code, err)
	}
}

// TestMTLSRotationUnderLoad: both sidecars' certificates are replaced
// every 500ms while callers keep sending requests over new and pooled
// connections: no request fails, and new handshakes present the new
// certificates (the application sees their hashes in XFCC).
func TestMTLSRotationUnderLoad(t *testing.T) {
	ca := mtlstest.NewCA(t)
	srvID, cliID := stores(t, ca)
	s := startSidecar(t, serverConfig(config.PeerStrict), srvID, echoApp(t))
	cfg := clientConfig(s, clusterHTTP1, apiID)
	// One idle connection kept: concurrent callers open new ones, so
	// handshakes go on throughout.
	cfg.Clusters[0].Pool.MaxIdlePerEndpoint = 1
	c := startSidecar(t, cfg, cliID, "")
	stop := make(chan struct{})
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	var hashes sync.Map // client certificates the application saw (XFCC Hash)
	var wg sync.WaitGroup
	for range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			hc := &http.Client{Timeout: 5 * time.Second}
			for {
				select {
				case <-stop:
					return
				default:
				}
				req, _ := http.NewRequest(http.MethodGet, "http://"+c.out+"/x", nil)
				req.Host = "api.shop"
				resp, err := hc.Do(req)
				var body []byte
				if err == nil {
					body, _ = io.ReadAll(resp.Body)
					resp.Body.Close()
					if resp.StatusCode != 200 || !strings.Contains(string(body), "URI="+webID) {
						err = fmt.Errorf("%d %q", resp.StatusCode, body)
					}
				}
				if err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				ok.Add(1)
				if _, h, found := strings.Cut(string(body), "Hash="); found {
					hashes.Store(h[:64], true)
				}
			}
		}()
	}
	serials := map[string]bool{}
	for range 6 {
		time.Sleep(500 * time.Millisecond)
		cliID.Set(ca.Issue(t, "front", "web"), ca.Roots())
		srvID.Set(ca.Issue(t, "shop", "api"), ca.Roots())
		serials[cliID.Certificate().Leaf.SerialNumber.String()] = true
	}
	time.Sleep(300 * time.Millisecond)
	close(stop)
	wg.Wait()
	hs := s.stats.Counter(`meshlet_mtls_inbound_connections_total{mode="STRICT",result="mtls"}`).Value()
	t.Logf("%d requests, %d mutual TLS handshakes, %d certificates", ok.Load(), hs, len(serials))
	if failed.Load() > 0 {
		t.Fatalf("%d of %d requests failed during rotation, first: %v", failed.Load(), ok.Load()+failed.Load(), firstErr.Load())
	}
	if ok.Load() < 100 || hs < 10 {
		t.Fatalf("too little load to mean anything: %d requests, %d handshakes", ok.Load(), hs)
	}
	seen := 0
	hashes.Range(func(_, _ any) bool { seen++; return true })
	if seen < 2 {
		t.Fatalf("the application saw %d client certificates over %d rotations: new handshakes do not use the rotated certificate", seen, len(serials))
	}
	// A new upstream connection (a changed pool setting builds the
	// cluster anew) presents the certificate in use now.
	cfg.Clusters[0].Pool.MaxIdlePerEndpoint = 2
	if err := c.engine.Update(cfg); err != nil {
		t.Fatal(err)
	}
	if code, body, err := get(t, c.out, nil); err != nil || code != 200 || !strings.HasSuffix(body, "xfcc="+xfccOf(apiID, cliID)) {
		t.Fatalf("new connection after the last rotation: %d %q %v\nwant XFCC %s", code, body, err, xfccOf(apiID, cliID))
	}
}

// clusterHTTP1 is a cluster's protocol http1.
const clusterHTTP1 = "http1"
