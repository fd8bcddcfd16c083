package generation_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/generation"
	"github.com/meshlet/meshlet/proxy/xds/xdstest"
	"github.com/meshlet/meshlet/webhook/discovery/translate"
)

// meshYAML is the proxy's own pod (127.0.0.1 in shop) behind a Service on
// the application's port, plus the given security objects.
func meshYAML(appPort int, security string) string { return meshYAMLPort(appPort, "http", security) }

// meshYAMLPort is meshYAML with the Service port's name (its protocol).
func meshYAMLPort(appPort int, portName, security string) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: reviews-0, namespace: shop, labels: {app: reviews}}
status: {podIP: 127.0.0.1, podIPs: [{ip: 127.0.0.1}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.9, clusterIPs: [10.96.0.9], ports: [{name: %[3]s, port: 9080, targetPort: %[1]d}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: %[3]s, port: %[1]d}]
endpoints: [{addresses: [127.0.0.1], targetRef: {kind: Pod, name: reviews-0, namespace: shop}}]
---
%[2]s`, appPort, security, portName)
}

// publicFromFrontend: only GET /public from namespace frontend (no
// plain-text peer has a namespace). withLoopback adds the same operation
// from 127.0.0.1 (an ipBlocks rule, which plain text can match).
func publicFromFrontend(withLoopback bool) string {
	s := `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: public, namespace: shop}
spec:
  selector: {matchLabels: {app: reviews}}
  rules:
  - from: [{source: {namespaces: [frontend]}}]
    to: [{operation: {methods: [GET], paths: [/public]}}]
`
	if withLoopback {
		s += `  - from: [{source: {ipBlocks: [127.0.0.1/32]}}]
    to: [{operation: {methods: [GET], paths: [/public]}}]
`
	}
	return s
}

// translated runs the discovery server's translation for the proxy
// reviews-0 and returns its resources as the ADS test server serves them.
func translated(t *testing.T, yaml string) map[resource.Type][]types.Resource {
	t.Helper()
	objs, err := translate.DecodeYAML([]byte(yaml))
	if err != nil {
		t.Fatal(err)
	}
	in := &translate.Inputs{}
	if rest := in.AddObjects(objs...); len(rest) > 0 {
		t.Fatalf("unexpected objects %v", rest)
	}
	m := translate.Compile(in)
	if w := m.Warnings(); len(w) > 0 {
		t.Fatalf("translation warnings: %v", w)
	}
	r := m.ForProxy(translate.Proxy{ID: translate.NodeID("127.0.0.1", "reviews-0", "shop", ""), IP: "127.0.0.1", Name: "reviews-0", Namespace: "shop"})
	return r.ByType()
}

// startAuthzGeneration runs a generation in xDS mode whose every
// connection's original destination is app (no capture rules), serving
// the translation of yaml as version 1; it returns once ready.
func startAuthzGeneration(t *testing.T, app, yaml string) (generation.Options, *xdstest.Server) {
	t.Helper()
	// Without capture rules every connection's original destination is the
	// application.
	o, nodeID := xdsGenerationOptions(t, "reviews-0", "reviews", true, netip.MustParseAddrPort(app))
	srv := xdstest.StartServer(t, o.XDS.Address, nodeID)
	srv.Set(t, "1", translated(t, yaml))
	runGeneration(t, o)
	deadline := time.Now().Add(10 * time.Second)
	for code, body := proctest.HTTPGet("http://" + o.HealthAddr + "/healthz/ready"); code != http.StatusOK; code, body = proctest.HTTPGet("http://" + o.HealthAddr + "/healthz/ready") {
		if time.Now().After(deadline) {
			t.Fatalf("not ready: %d %q", code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}

	return o, srv
}

// TestGenerationXDSAuthorization: a proxy generation in xDS mode gets the
// inbound listener the discovery server's translation emits for an
// AuthorizationPolicy allowing only GET /public from namespace frontend.
// A plain-text peer (no identity) is denied 403 "RBAC: access denied"; an
// ipBlocks rule for it allows GET /public and nothing else; removing the
// policy restores access live, on the same keep-alive connection; an RBAC
// configuration the proxy cannot compile is NACKed naming the listener and
// field and the previous configuration keeps serving.
func TestGenerationXDSAuthorization(t *testing.T) {
	app := backend(t, "app")
	appPort := int(netip.MustParseAddrPort(app).Port())

	o, srv := startAuthzGeneration(t, app, meshYAML(appPort, publicFromFrontend(false)))
	// One keep-alive connection for the whole test: configuration changes
	// must not close it.
	var conns int
	tr := &http.Transport{MaxConnsPerHost: 1, DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		conns++
		return (&net.Dialer{}).DialContext(ctx, network, addr)
	}}
	client := &http.Client{Transport: tr, Timeout: 3 * time.Second}
	t.Cleanup(tr.CloseIdleConnections)
	do := func(method, path string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(method, "http://"+o.InboundAddr+path, nil)
		req.Host = "reviews.shop.svc.cluster.local:9080"
		resp, err := client.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	expect := func(what string, want map[string]int) {
		t.Helper()
		for mp, code := range want {
			method, path, _ := strings.Cut(mp, " ")
			got, body := do(method, path)
			wantBody := "app"
			if code == http.StatusForbidden {
				wantBody = "RBAC: access denied"
			}
			if got != code || body != wantBody {
				t.Errorf("%s: %s: %d %q, want %d %q", what, mp, got, body, code, wantBody)
			}
		}
	}
	waitFor := func(what, method, path string, code int) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			got, _ := do(method, path)
			if got == code {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: %s %s still %d, want %d", what, method, path, got, code)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	expect("namespace rule, plain-text peer", map[string]int{"GET /public": 403, "GET /private": 403, "POST /public": 403})
	_, prom := proctest.HTTPGet("http://" + o.PrometheusAddr + "/stats/prometheus")
	if !strings.Contains(prom, `meshlet_rbac_denied_total{policy=""} 3`) {
		t.Errorf("metrics have no meshlet_rbac_denied_total{policy=\"\"} 3:\n%s", grepLines(prom, "rbac"))
	}

	v2 := translated(t, meshYAML(appPort, publicFromFrontend(true)))
	srv.Set(t, "2", v2)
	waitFor("ipBlocks rule added", http.MethodGet, "/public", http.StatusOK)
	expect("ipBlocks rule", map[string]int{"GET /public": 200, "GET /private": 403, "POST /public": 403, "GET /public/x": 403})

	// A rule the proxy cannot evaluate: NACKed, version 2 keeps serving.
	bad := cloneResources(v2)
	addUnsupportedPermission(t, bad)
	srv.Set(t, "3", bad)
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(strings.Join(srv.NACKs(), "\n"), "virtualInbound") {
		if time.Now().After(deadline) {
			t.Fatalf("no NACK naming virtualInbound; NACKs %q", srv.NACKs())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if n := strings.Join(srv.NACKs(), "\n"); !strings.Contains(n, "envoy.filters.http.rbac") || !strings.Contains(n, "metadata: not supported") {
		t.Errorf("NACK %q does not name the RBAC filter and the refused field", n)
	}
	expect("after the NACK", map[string]int{"GET /public": 200, "GET /private": 403})

	srv.Set(t, "4", translated(t, meshYAML(appPort, "")))
	waitFor("policy removed", http.MethodGet, "/private", http.StatusOK)
	expect("no policy", map[string]int{"GET /public": 200, "GET /private": 200, "POST /public": 200})
	if conns != 1 {
		t.Errorf("%d downstream connections dialled, want 1 (configuration changes must not close connections)", conns)
	}
}

// TestGenerationXDSAuthorizationTCP: on an inbound TCP port an
// AuthorizationPolicy's network rules decide each connection before a byte
// reaches the application: an ipBlocks rule that does not cover the
// client closes the connection (the echo server never sees it), one that
// does lets it through, and removing the policy restores access live.
func TestGenerationXDSAuthorizationTCP(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var accepted atomic.Int64
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	app := ln.Addr().String()
	appPort := int(netip.MustParseAddrPort(app).Port())
	policy := func(block string) string {
		return `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db-clients, namespace: shop}
spec:
  rules:
  - from: [{source: {ipBlocks: [` + block + `]}}]
`
	}
	o, srv := startAuthzGeneration(t, app, meshYAMLPort(appPort, "tcp-db", policy("10.9.0.0/16")))
	echo := func() (string, error) {
		c, err := net.DialTimeout("tcp", o.InboundAddr, 3*time.Second)
		if err != nil {
			return "", err
		}
		defer c.Close()
		_ = c.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := c.Write([]byte("ping\n")); err != nil {
			return "", err
		}
		b := make([]byte, 5)
		_, err = io.ReadFull(c, b)
		return string(b[:]), err
	}
	if got, err := echo(); err == nil {
		t.Errorf("ipBlocks 10.9.0.0/16: a connection from 127.0.0.1 was echoed %q, want it closed", got)
	}
	if n := accepted.Load(); n != 0 {
		t.Errorf("the application accepted %d connections while the policy denies them", n)
	}
	waitEcho := func(what string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			got, err := echo()
			if err == nil && got == "ping\n" {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s: echo %q, %v; accepted %d; log:\n%s", what, got, err, accepted.Load(), o.Log.(*proctest.SyncBuf).String())
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	srv.Set(t, "2", translated(t, meshYAMLPort(appPort, "tcp-db", policy("127.0.0.1/32"))))
	waitEcho("ipBlocks 127.0.0.1/32")
	srv.Set(t, "3", translated(t, meshYAMLPort(appPort, "tcp-db", policy("10.9.0.0/16"))))
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := echo(); err != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the denying policy again: connections still echoed")
		}
		time.Sleep(20 * time.Millisecond)
	}
	srv.Set(t, "4", translated(t, meshYAMLPort(appPort, "tcp-db", "")))
	waitEcho("no policy")
	_, prom := proctest.HTTPGet("http://" + o.PrometheusAddr + "/stats/prometheus")
	if !strings.Contains(prom, `meshlet_rbac_denied_total{policy=""}`) {
		t.Errorf("no meshlet_rbac_denied_total for the closed connections:\n%s", grepLines(prom, "rbac"))
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func cloneResources(rs map[resource.Type][]types.Resource) map[resource.Type][]types.Resource {
	out := map[resource.Type][]types.Resource{}
	for k, v := range rs {
		for _, r := range v {
			out[k] = append(out[k], proto.Clone(r))
		}
	}
	return out
}

// addUnsupportedPermission adds a metadata permission (which proxy/rbac
// refuses) to the ALLOW rules of virtualInbound's HTTP chains.
func addUnsupportedPermission(t *testing.T, rs map[resource.Type][]types.Resource) {
	t.Helper()
	for _, r := range rs[resource.ListenerType] {
		l := r.(*listenerv3.Listener)
		if l.GetName() != translate.VirtualInbound {
			continue
		}
		for _, fc := range l.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				hcm := &hcmv3.HttpConnectionManager{}
				if f.GetTypedConfig().UnmarshalTo(hcm) != nil {
					continue
				}
				for _, hf := range hcm.GetHttpFilters() {
					cfg := &rbachttpv3.RBAC{}
					if hf.GetName() != translate.HTTPRBACFilterName || hf.GetTypedConfig().UnmarshalTo(cfg) != nil {
						continue
					}
					cfg.Rules.Policies["extra"] = &rbacv3.Policy{
						Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_Metadata{}}},
						Principals:  []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}},
					}
					hf.ConfigType = &hcmv3.HttpFilter_TypedConfig{TypedConfig: xdstest.MustAny(cfg)}
				}
				f.ConfigType = &listenerv3.Filter_TypedConfig{TypedConfig: xdstest.MustAny(hcm)}
			}
		}
		return
	}
	t.Fatal("no virtualInbound listener")
}
