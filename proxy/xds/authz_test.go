package xds

import (
	"net/http"
	"net/http/httptest"
	"net/netip"
	"testing"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"

	"github.com/meshlet/meshlet/proxy/rbac"
)

// BenchmarkInboundAuthorize is the per-request cost the engine's inbound
// route pays with one ALLOW policy (GET /public): attributes, the port's
// engine, evaluation.
func BenchmarkInboundAuthorize(b *testing.B) {
	get := &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{Name: ":method",
		HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: &matcherv3.StringMatcher{
			MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "GET"}}}}}}
	e, err := rbac.CompileHTTP(&rbachttpv3.RBAC{Rules: &rbacv3.RBAC{Action: rbacv3.RBAC_ALLOW, Policies: map[string]*rbacv3.Policy{
		"ns[shop]-policy[public]-rule[0]": {
			Permissions: []*rbacv3.Permission{{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: []*rbacv3.Permission{get,
				{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{Rule: &matcherv3.PathMatcher_Path{Path: &matcherv3.StringMatcher{
					MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "/public"}}}}}}}}}}},
			Principals: []*rbacv3.Principal{{Identifier: &rbacv3.Principal_Any{Any: true}}},
		}}}})
	if err != nil {
		b.Fatal(err)
	}
	a := &inboundAuthz{http: map[uint32]*rbac.Engine{9080: e}}
	r := httptest.NewRequest(http.MethodGet, "http://reviews/public?x=1", nil)
	dst := netip.MustParseAddrPort("10.1.0.1:9080")
	b.ReportAllocs()
	for b.Loop() {
		if ok, _ := a.authorize(r, dst); !ok {
			b.Fatal("denied")
		}
	}
}
