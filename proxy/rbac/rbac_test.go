package rbac

import (
	"net/http"
	"net/netip"
	"strings"
	"testing"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	rbactcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	"google.golang.org/protobuf/encoding/protojson"
)

// rules parses an envoy.config.rbac.v3.RBAC written as protojson.
func rules(t testing.TB, js string) *rbacv3.RBAC {
	t.Helper()
	r := &rbacv3.RBAC{}
	if err := protojson.Unmarshal([]byte(js), r); err != nil {
		t.Fatalf("bad test RBAC %s: %v", js, err)
	}
	if err := r.ValidateAll(); err != nil {
		t.Fatalf("test RBAC is not valid Envoy config: %v\n%s", err, js)
	}
	return r
}

func compile(t testing.TB, sets ...string) *Engine {
	t.Helper()
	var rs []*rbacv3.RBAC
	for _, s := range sets {
		rs = append(rs, rules(t, s))
	}
	e, err := Compile(rs...)
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// request is a typical HTTP request from shop/sleep over mTLS.
func request() *Attributes {
	return &Attributes{
		Principal:       "spiffe://cluster.local/ns/shop/sa/sleep",
		SourceIP:        netip.MustParseAddr("10.1.2.3"),
		DestinationIP:   netip.MustParseAddr("10.1.0.1"),
		DestinationPort: 9080,
		ServerName:      "outbound_.9080_._.reviews.shop.svc.cluster.local",
		Host:            "reviews.shop:9080",
		Method:          "GET",
		Path:            "/api/v1/items?id=7",
		Headers:         http.Header{"X-Tenant": {"acme"}, "X-Multi": {"a", "b"}},
	}
}

// allowOnly is an ALLOW set with one policy: permission perm, any principal
// (or principal prin, any permission).
func permOnly(perm string) string {
	return `{"action":"ALLOW","policies":{"p":{"permissions":[` + perm + `],"principals":[{"any":true}]}}}`
}

func prinOnly(prin string) string {
	return `{"action":"ALLOW","policies":{"p":{"permissions":[{"any":true}],"principals":[` + prin + `]}}}`
}

func TestPermissionMatchers(t *testing.T) {
	for _, c := range []struct {
		name, perm string
		mod        func(*Attributes)
		want       bool
	}{
		{"any", `{"any":true}`, nil, true},
		{"port match", `{"destinationPort":9080}`, nil, true},
		{"port other", `{"destinationPort":9081}`, nil, false},
		{"port range in", `{"destinationPortRange":{"start":9000,"end":9081}}`, nil, true},
		{"port range end excluded", `{"destinationPortRange":{"start":9000,"end":9080}}`, nil, false},
		{"destination ip in", `{"destinationIp":{"addressPrefix":"10.1.0.0","prefixLen":16}}`, nil, true},
		{"destination ip out", `{"destinationIp":{"addressPrefix":"10.2.0.0","prefixLen":16}}`, nil, false},
		{"path exact ignores query", `{"urlPath":{"path":{"exact":"/api/v1/items"}}}`, nil, true},
		{"path exact other", `{"urlPath":{"path":{"exact":"/api/v1"}}}`, nil, false},
		{"path prefix", `{"urlPath":{"path":{"prefix":"/api/"}}}`, nil, true},
		{"path suffix", `{"urlPath":{"path":{"suffix":"/items"}}}`, nil, true},
		{"path suffix not in query", `{"urlPath":{"path":{"suffix":"id=7"}}}`, nil, false},
		{"path regex full", `{"urlPath":{"path":{"safeRegex":{"regex":"/api/v[0-9]+/items"}}}}`, nil, true},
		{"path regex partial is no match", `{"urlPath":{"path":{"safeRegex":{"regex":"v1"}}}}`, nil, false},
		{"path on tcp", `{"urlPath":{"path":{"prefix":"/"}}}`, func(a *Attributes) { a.Path = "" }, false},
		{"method", `{"header":{"name":":method","stringMatch":{"exact":"GET"}}}`, nil, true},
		{"method other", `{"header":{"name":":method","stringMatch":{"exact":"POST"}}}`, nil, false},
		{"authority ignore case", `{"header":{"name":":authority","stringMatch":{"prefix":"REVIEWS.shop","ignoreCase":true}}}`, nil, true},
		{"authority case sensitive", `{"header":{"name":":authority","stringMatch":{"prefix":"REVIEWS.shop"}}}`, nil, false},
		{"host alias of authority", `{"header":{"name":"host","stringMatch":{"suffix":":9080"}}}`, nil, true},
		{"header exact", `{"header":{"name":"x-tenant","stringMatch":{"exact":"acme"}}}`, nil, true},
		{"header name case", `{"header":{"name":"X-TENANT","stringMatch":{"exact":"acme"}}}`, nil, true},
		{"header joined values", `{"header":{"name":"x-multi","stringMatch":{"exact":"a,b"}}}`, nil, true},
		{"header contains", `{"header":{"name":"x-tenant","stringMatch":{"contains":"cm"}}}`, nil, true},
		{"header contains ignore case", `{"header":{"name":"x-tenant","stringMatch":{"contains":"CM","ignoreCase":true}}}`, nil, true},
		{"header present", `{"header":{"name":"x-tenant","presentMatch":true}}`, nil, true},
		{"header present missing", `{"header":{"name":"x-none","presentMatch":true}}`, nil, false},
		{"header absent wanted", `{"header":{"name":"x-none","presentMatch":false}}`, nil, true},
		{"header inverted", `{"header":{"name":"x-tenant","stringMatch":{"exact":"other"},"invertMatch":true}}`, nil, true},
		{"header missing inverted", `{"header":{"name":"x-none","stringMatch":{"exact":"v"},"invertMatch":true}}`, nil, true},
		{"header missing", `{"header":{"name":"x-none","stringMatch":{"exact":""}}}`, nil, false},
		{"header missing as empty", `{"header":{"name":"x-none","stringMatch":{"exact":""},"treatMissingHeaderAsEmpty":true}}`, nil, true},
		{"header deprecated prefix", `{"header":{"name":"x-tenant","prefixMatch":"ac"}}`, nil, true},
		{"header regex", `{"header":{"name":"x-tenant","safeRegexMatch":{"regex":"a.me"}}}`, nil, true},
		{"sni", `{"requestedServerName":{"suffix":".reviews.shop.svc.cluster.local"}}`, nil, true},
		{"not", `{"notRule":{"destinationPort":9080}}`, nil, false},
		{"and", `{"andRules":{"rules":[{"destinationPort":9080},{"header":{"name":":method","stringMatch":{"exact":"GET"}}}]}}`, nil, true},
		{"and one false", `{"andRules":{"rules":[{"destinationPort":9080},{"header":{"name":":method","stringMatch":{"exact":"PUT"}}}]}}`, nil, false},
		{"or", `{"orRules":{"rules":[{"destinationPort":1},{"destinationPort":9080}]}}`, nil, true},
		{"or none", `{"orRules":{"rules":[{"destinationPort":1},{"destinationPort":2}]}}`, nil, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			a := request()
			if c.mod != nil {
				c.mod(a)
			}
			if got := compile(t, permOnly(c.perm)).Evaluate(a).Allowed; got != c.want {
				t.Errorf("permission %s on %+v: matched %v, want %v", c.perm, a, got, c.want)
			}
		})
	}
}

func TestPrincipalMatchers(t *testing.T) {
	plain := func(a *Attributes) { a.Principal = "" }
	for _, c := range []struct {
		name, prin string
		mod        func(*Attributes)
		want       bool
	}{
		{"any", `{"any":true}`, nil, true},
		{"principal exact", `{"authenticated":{"principalName":{"exact":"spiffe://cluster.local/ns/shop/sa/sleep"}}}`, nil, true},
		{"principal other", `{"authenticated":{"principalName":{"exact":"spiffe://cluster.local/ns/shop/sa/other"}}}`, nil, false},
		{"principal prefix", `{"authenticated":{"principalName":{"prefix":"spiffe://cluster.local/ns/shop/"}}}`, nil, true},
		{"principal suffix", `{"authenticated":{"principalName":{"suffix":"/sa/sleep"}}}`, nil, true},
		{"namespace regex", `{"authenticated":{"principalName":{"safeRegex":{"regex":".*/ns/shop/.*"}}}}`, nil, true},
		{"namespace regex other", `{"authenticated":{"principalName":{"safeRegex":{"regex":".*/ns/shopping/.*"}}}}`, nil, false},
		{"any authenticated", `{"authenticated":{}}`, nil, true},
		{"any authenticated plain text", `{"authenticated":{}}`, plain, false},
		{"principal plain text", `{"authenticated":{"principalName":{"safeRegex":{"regex":".*"}}}}`, plain, false},
		{"not principal plain text", `{"notId":{"authenticated":{"principalName":{"exact":"spiffe://x"}}}}`, plain, true},
		{"direct ip", `{"directRemoteIp":{"addressPrefix":"10.1.0.0","prefixLen":16}}`, nil, true},
		{"direct ip single", `{"directRemoteIp":{"addressPrefix":"10.1.2.3","prefixLen":32}}`, nil, true},
		{"direct ip out", `{"directRemoteIp":{"addressPrefix":"10.9.0.0","prefixLen":16}}`, nil, false},
		{"direct ip v6 vs v4", `{"directRemoteIp":{"addressPrefix":"::","prefixLen":0}}`, nil, false},
		{"source ip deprecated", `{"sourceIp":{"addressPrefix":"10.1.2.0","prefixLen":24}}`, nil, true},
		{"remote ip falls back to direct", `{"remoteIp":{"addressPrefix":"10.1.2.3","prefixLen":32}}`, nil, true},
		{"remote ip forwarded", `{"remoteIp":{"addressPrefix":"203.0.113.0","prefixLen":24}}`, func(a *Attributes) { a.RemoteIP = netip.MustParseAddr("203.0.113.9") }, true},
		{"direct ip ignores forwarded", `{"directRemoteIp":{"addressPrefix":"203.0.113.0","prefixLen":24}}`, func(a *Attributes) { a.RemoteIP = netip.MustParseAddr("203.0.113.9") }, false},
		{"header", `{"header":{"name":"x-tenant","stringMatch":{"exact":"acme"}}}`, nil, true},
		{"url path", `{"urlPath":{"path":{"prefix":"/api"}}}`, nil, true},
		{"and", `{"andIds":{"ids":[{"authenticated":{}},{"directRemoteIp":{"addressPrefix":"10.0.0.0","prefixLen":8}}]}}`, nil, true},
		{"and one false", `{"andIds":{"ids":[{"authenticated":{}},{"directRemoteIp":{"addressPrefix":"11.0.0.0","prefixLen":8}}]}}`, nil, false},
		{"or", `{"orIds":{"ids":[{"directRemoteIp":{"addressPrefix":"11.0.0.0","prefixLen":8}},{"authenticated":{}}]}}`, nil, true},
		{"not", `{"notId":{"any":true}}`, nil, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			a := request()
			if c.mod != nil {
				c.mod(a)
			}
			if got := compile(t, prinOnly(c.prin)).Evaluate(a).Allowed; got != c.want {
				t.Errorf("principal %s on %+v: matched %v, want %v", c.prin, a, got, c.want)
			}
		})
	}
}

// TestPolicyNeedsPermissionAndPrincipal: a policy matches only when one
// permission AND one principal match.
func TestPolicyNeedsPermissionAndPrincipal(t *testing.T) {
	e := compile(t, `{"action":"ALLOW","policies":{"p":{
		"permissions":[{"destinationPort":1},{"destinationPort":9080}],
		"principals":[{"directRemoteIp":{"addressPrefix":"11.0.0.0","prefixLen":8}},{"authenticated":{}}]}}}`)
	if d := e.Evaluate(request()); !d.Allowed || d.Policy != "p" {
		t.Errorf("got %+v, want allowed by p", d)
	}
	a := request()
	a.Principal = ""
	if d := e.Evaluate(a); d.Allowed {
		t.Errorf("permission matched without a principal: %+v", d)
	}
	a = request()
	a.DestinationPort = 2
	if d := e.Evaluate(a); d.Allowed {
		t.Errorf("principal matched without a permission: %+v", d)
	}
}

// TestOrder: Istio's order as the filters carry it — DENY set first, then
// the ALLOW set; no sets: allow; an empty ALLOW set denies everything.
func TestOrder(t *testing.T) {
	denyAdmin := `{"action":"DENY","policies":{
		"ns[shop]-policy[deny-admin]-rule[0]":{"permissions":[{"urlPath":{"path":{"prefix":"/admin"}}}],"principals":[{"any":true}]},
		"ns[shop]-policy[a-deny-all-posts]-rule[0]":{"permissions":[{"header":{"name":":method","stringMatch":{"exact":"POST"}}}],"principals":[{"any":true}]}}}`
	allowShop := `{"action":"ALLOW","policies":{
		"ns[shop]-policy[allow-shop]-rule[0]":{"permissions":[{"any":true}],"principals":[{"authenticated":{"principalName":{"safeRegex":{"regex":".*/ns/shop/.*"}}}}]},
		"ns[shop]-policy[allow-any-get]-rule[0]":{"permissions":[{"header":{"name":":method","stringMatch":{"exact":"GET"}}}],"principals":[{"any":true}]}}}`
	with := func(f func(*Attributes)) *Attributes { a := request(); f(a); return a }
	for _, c := range []struct {
		name   string
		sets   []string
		a      *Attributes
		allow  bool
		policy string
	}{
		{"no rules allows", nil, request(), true, ""},
		{"deny only, no match", []string{denyAdmin}, request(), true, ""},
		{"deny only, match", []string{denyAdmin}, with(func(a *Attributes) { a.Path = "/admin/x" }), false, "ns[shop]-policy[deny-admin]-rule[0]"},
		{"deny wins over allow", []string{denyAdmin, allowShop}, with(func(a *Attributes) { a.Path = "/admin" }), false, "ns[shop]-policy[deny-admin]-rule[0]"},
		{"first deny policy by name", []string{denyAdmin}, with(func(a *Attributes) { a.Path = "/admin"; a.Method = "POST" }), false, "ns[shop]-policy[a-deny-all-posts]-rule[0]"},
		{"allow match, first by name", []string{denyAdmin, allowShop}, request(), true, "ns[shop]-policy[allow-any-get]-rule[0]"},
		{"allow other policy", []string{denyAdmin, allowShop}, with(func(a *Attributes) { a.Method = "PUT" }), true, "ns[shop]-policy[allow-shop]-rule[0]"},
		{"allow no match denies", []string{denyAdmin, allowShop}, with(func(a *Attributes) { a.Method = "PUT"; a.Principal = "" }), false, ""},
		{"empty allow set denies all", []string{`{"action":"ALLOW"}`}, request(), false, ""},
		{"empty deny set allows", []string{`{"action":"DENY"}`}, request(), true, ""},
		{"allow then deny (filter order)", []string{allowShop, denyAdmin}, with(func(a *Attributes) { a.Path = "/admin" }), false, "ns[shop]-policy[deny-admin]-rule[0]"},
	} {
		t.Run(c.name, func(t *testing.T) {
			d := compile(t, c.sets...).Evaluate(c.a)
			if d.Allowed != c.allow || d.Policy != c.policy {
				t.Errorf("got %+v, want allowed=%v policy=%q", d, c.allow, c.policy)
			}
		})
	}
	var nilEngine *Engine
	if !nilEngine.Evaluate(request()).Allowed || !nilEngine.Empty() {
		t.Error("a nil engine must allow")
	}
}

func TestCompileFilters(t *testing.T) {
	deny := rules(t, `{"action":"DENY","policies":{"p":{"permissions":[{"destinationPort":9080}],"principals":[{"any":true}]}}}`)
	e, err := CompileHTTP(&rbachttpv3.RBAC{}, &rbachttpv3.RBAC{Rules: deny})
	if err != nil {
		t.Fatal(err)
	}
	if d := e.Evaluate(request()); d.Allowed || d.Policy != "p" {
		t.Errorf("http: got %+v", d)
	}
	e, err = CompileNetwork(&rbactcpv3.RBAC{Rules: deny, StatPrefix: "tcp."})
	if err != nil {
		t.Fatal(err)
	}
	if d := e.Evaluate(&Attributes{DestinationPort: 9080}); d.Allowed {
		t.Errorf("tcp: got %+v", d)
	}
	if _, err := CompileNetwork(&rbactcpv3.RBAC{Rules: deny, EnforcementType: rbactcpv3.RBAC_CONTINUOUS}); err == nil || !strings.Contains(err.Error(), "enforcement_type") {
		t.Errorf("CONTINUOUS: err %v", err)
	}
}

// TestCompileRefuses: every field the engine cannot evaluate is an error
// naming it, never a silent match or non-match.
func TestCompileRefuses(t *testing.T) {
	for _, c := range []struct{ js, want string }{
		{`{"action":"LOG"}`, "action: LOG"},
		{`{"policies":{"p":{"permissions":[{"metadata":{"filter":"f","path":[{"key":"k"}],"value":{"presentMatch":true}}}],"principals":[{"any":true}]}}}`, "policies[p]: permissions[0]: metadata: not supported"},
		{`{"policies":{"p":{"permissions":[{"any":true}],"principals":[{"filterState":{"key":"k","stringMatch":{"exact":"v"}}}]}}}`, "principals[0]: filter_state: not supported"},
		{`{"policies":{"p":{"permissions":[{"andRules":{"rules":[{"notRule":{"uriTemplate":{"name":"envoy.path.match.uri_template.uri_template_matcher","typedConfig":{"@type":"type.googleapis.com/google.protobuf.Empty"}}}}]}}],"principals":[{"any":true}]}}}`, "and_rules.rules[0]: not_rule: uri_template: not supported"},
		{`{"policies":{"p":{"permissions":[{"any":true}],"principals":[{"any":true}],"condition":{"constExpr":{"boolValue":true}}}}}`, "condition: CEL"},
		{`{"policies":{"p":{"permissions":[{"urlPath":{"path":{"safeRegex":{"regex":"("}}}}],"principals":[{"any":true}]}}}`, "url_path.path: safe_regex"},
		{`{"policies":{"p":{"permissions":[{"any":true}],"principals":[{"directRemoteIp":{"addressPrefix":"nope","prefixLen":8}}]}}}`, `direct_remote_ip: address_prefix "nope"`},
		{`{"policies":{"p":{"permissions":[{"any":true}],"principals":[{"remoteIp":{"addressPrefix":"10.0.0.0","prefixLen":33}}]}}}`, "remote_ip: prefix_len 33"},
	} {
		r := &rbacv3.RBAC{}
		if err := protojson.Unmarshal([]byte(c.js), r); err != nil {
			t.Fatalf("%s: %v", c.js, err)
		}
		_, err := Compile(r)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%s: error %v, want one containing %q", c.js, err, c.want)
		}
	}
	_, err := CompileHTTP(&rbachttpv3.RBAC{Matcher: nil, Rules: nil}, &rbachttpv3.RBAC{Rules: &rbacv3.RBAC{Policies: map[string]*rbacv3.Policy{"p": {}}}})
	if err == nil || !strings.Contains(err.Error(), "at least one permission") {
		t.Errorf("empty policy: %v", err)
	}
}

func TestSourceNamespace(t *testing.T) {
	for in, want := range map[string]string{
		"spiffe://cluster.local/ns/shop/sa/sleep": "shop",
		"spiffe://td/ns/a-b/sa/x":                 "a-b",
		"spiffe://td/ns//sa/x":                    "",
		"spiffe://td/sa/x":                        "",
		"cluster.local/ns/shop/sa/sleep":          "",
		"":                                        "",
	} {
		if got := SourceNamespace(in); got != want {
			t.Errorf("SourceNamespace(%q) = %q, want %q", in, got, want)
		}
	}
}
