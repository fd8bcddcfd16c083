package translate

import (
	"net/http"
	"net/netip"
	"testing"

	"github.com/meshlet/meshlet/proxy/rbac"
)

// TestSecurityDecisions translates policies and runs requests through the
// proxy's evaluator (proxy/rbac) on the translated HTTP and TCP filters: the
// decisions Istio's semantics give, end to end from the YAML a user writes.
func TestSecurityDecisions(t *testing.T) {
	type req struct {
		name      string
		principal string // "" = plain text
		ip        string
		port      uint32
		method    string
		path      string
		host      string
		headers   map[string]string
		allowed   bool
	}
	front := "spiffe://cluster.local/ns/frontend/sa/web"
	shop := "spiffe://cluster.local/ns/shop/sa/sleep"
	cases := []struct {
		name string
		yaml string
		http []req
		tcp  []req
	}{
		{
			name: "only GET /public from frontend",
			yaml: `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: public-only, namespace: shop}
spec:
  rules:
  - from: [{source: {namespaces: [frontend]}}]
    to: [{operation: {methods: [GET], paths: [/public]}}]`,
			http: []req{
				{name: "GET /public from frontend", principal: front, method: "GET", path: "/public", allowed: true},
				{name: "GET /public?x=1 from frontend", principal: front, method: "GET", path: "/public?x=1", allowed: true},
				{name: "POST /public from frontend", principal: front, method: "POST", path: "/public"},
				{name: "GET /private from frontend", principal: front, method: "GET", path: "/private"},
				{name: "GET /public from shop", principal: shop, method: "GET", path: "/public"},
				{name: "GET /public plain text", method: "GET", path: "/public"},
				{name: "namespace frontend-evil is not frontend", principal: "spiffe://cluster.local/ns/frontend-evil/sa/web", method: "GET", path: "/public"},
			},
			tcp: []req{{name: "any connection denied (the only rule is HTTP-only)", principal: front}},
		},
		{
			name: "no policy allows",
			yaml: `
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}`,
			http: []req{{name: "anything", method: "DELETE", path: "/", allowed: true}},
			tcp:  []req{{name: "anything", allowed: true}},
		},
		{
			name: "allow nothing, allow all",
			yaml: `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-nothing, namespace: shop}
spec: {}`,
			http: []req{{name: "denied", principal: shop, method: "GET", path: "/"}},
			tcp:  []req{{name: "denied", principal: shop}},
		},
		{
			name: "deny beats allow; a refused DENY field denies more",
			yaml: `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: shop}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: istio-system}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"], notMethods: [OPTIONS]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-anonymous-secret, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {notRequestPrincipals: ["*"]}}]
    to: [{operation: {paths: [/secret]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-legacy-net, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {ipBlocks: [10.66.0.0/16, "10.67.0.0/33"]}}]
    to: [{operation: {ports: ["9090"]}}]`,
			http: []req{
				{name: "GET / allowed", principal: shop, method: "GET", path: "/", allowed: true},
				{name: "GET /admin/x denied by the mesh-wide DENY", principal: shop, method: "GET", path: "/admin/x"},
				{name: "OPTIONS /admin allowed (notMethods)", principal: shop, method: "OPTIONS", path: "/admin", allowed: true},
				{name: "/secret denied to everyone (requestPrincipals refused: fail closed)", principal: shop, method: "GET", path: "/secret"},
				{name: "port 9090 denied to every source (invalid ipBlocks refused: fail closed)", principal: shop, ip: "10.1.2.3", port: 9090, method: "GET", path: "/"},
			},
			tcp: []req{
				{name: "TCP denied: the /admin DENY has only HTTP fields, so it denies every connection (Istio)", principal: shop},
			},
		},
		{
			name: "TCP rules",
			yaml: `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db, namespace: shop}
spec:
  rules:
  - from: [{source: {principals: [cluster.local/ns/shop/sa/sleep], ipBlocks: [10.1.0.0/16]}}]
    to: [{operation: {ports: ["5432"]}}]`,
			tcp: []req{
				{name: "sleep from 10.1/16 to 5432", principal: shop, ip: "10.1.9.9", port: 5432, allowed: true},
				{name: "sleep from elsewhere", principal: shop, ip: "10.2.9.9", port: 5432},
				{name: "other port", principal: shop, ip: "10.1.9.9", port: 5433},
				{name: "plain text", ip: "10.1.9.9", port: 5432},
			},
		},
		{
			name: "when conditions",
			yaml: `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: tenants, namespace: shop}
spec:
  rules:
  - when:
    - {key: "request.headers[X-Tenant]", values: ["acme", "beta-*"], notValues: [beta-test]}
    - {key: source.namespace, values: [frontend]}
    - {key: destination.port, values: ["9080"]}`,
			http: []req{
				{name: "acme", principal: front, port: 9080, method: "GET", path: "/", headers: map[string]string{"X-Tenant": "acme"}, allowed: true},
				{name: "beta-1", principal: front, port: 9080, method: "GET", path: "/", headers: map[string]string{"X-Tenant": "beta-1"}, allowed: true},
				{name: "beta-test excluded", principal: front, port: 9080, method: "GET", path: "/", headers: map[string]string{"X-Tenant": "beta-test"}},
				{name: "no header", principal: front, port: 9080, method: "GET", path: "/"},
				{name: "wrong port", principal: front, port: 9081, method: "GET", path: "/", headers: map[string]string{"X-Tenant": "acme"}},
				{name: "wrong namespace", principal: shop, port: 9080, method: "GET", path: "/", headers: map[string]string{"X-Tenant": "acme"}},
			},
		},
		{
			name: "CUSTOM fails closed",
			yaml: `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec:
  action: CUSTOM
  provider: {name: opa}
  rules: [{to: [{operation: {paths: ["/api/*"]}}]}]`,
			http: []req{
				{name: "/api/x denied", principal: shop, method: "GET", path: "/api/x"},
				{name: "/other allowed", principal: shop, method: "GET", path: "/other", allowed: true},
			},
		},
		{
			name: "hosts",
			yaml: `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: hosts, namespace: shop}
spec:
  rules: [{to: [{operation: {hosts: ["reviews.shop.svc.cluster.local", "*.example.com"]}}]}]`,
			http: []req{
				{name: "exact, other case", host: "Reviews.Shop.svc.cluster.local", method: "GET", path: "/", allowed: true},
				{name: "suffix", host: "a.example.com", method: "GET", path: "/", allowed: true},
				{name: "other", host: "ratings.shop", method: "GET", path: "/"},
			},
		},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			objs, err := DecodeYAML([]byte(c.yaml))
			if err != nil {
				t.Fatal(err)
			}
			in := &SecurityInputs{}
			if rest := in.AddObjects(objs...); len(rest) > 0 {
				t.Fatalf("unexpected objects %v", rest)
			}
			p := Proxy{Name: "reviews-v1-a", Namespace: "shop", Labels: map[string]string{"app": "reviews"}}
			sec := CompileSecurity(in).ForProxy(p)
			httpEngine, err := rbac.CompileHTTP(sec.HTTP...)
			if err != nil {
				t.Fatal(err)
			}
			tcpEngine, err := rbac.CompileNetwork(sec.TCP...)
			if err != nil {
				t.Fatal(err)
			}
			run := func(kind string, e *rbac.Engine, rs []req) {
				for _, r := range rs {
					a := &rbac.Attributes{Principal: r.principal, SourceIP: netip.MustParseAddr(or(r.ip, "10.1.2.3")),
						DestinationPort: r.port, Method: r.method, Path: r.path, Host: or(r.host, "reviews.shop")}
					if a.DestinationPort == 0 {
						a.DestinationPort = 9080
					}
					if kind == "tcp" {
						a.Method, a.Path, a.Host = "", "", ""
					}
					if len(r.headers) > 0 {
						a.Headers = http.Header{}
						for k, v := range r.headers {
							a.Headers.Set(k, v)
						}
					}
					if d := e.Evaluate(a); d.Allowed != r.allowed {
						t.Errorf("%s %s: got %+v, want allowed=%v", kind, r.name, d, r.allowed)
					}
				}
			}
			run("http", httpEngine, c.http)
			run("tcp", tcpEngine, c.tcp)
		})
	}
}
