package rbac

import (
	"fmt"
	"net/http"
	"net/netip"
	"strings"
	"testing"
)

// fuzzDeny is a DENY set whose conditions the fuzz oracle below restates in
// plain Go; it is followed by an ALLOW set that allows everything, so a
// request must be denied exactly when the oracle says a DENY rule matches.
const fuzzDeny = `{"action":"DENY","policies":{
 "admin":{"permissions":[{"urlPath":{"path":{"prefix":"/admin"}}}],"principals":[{"any":true}]},
 "evil-ns":{"permissions":[{"any":true}],"principals":[{"authenticated":{"principalName":{"safeRegex":{"regex":".*/ns/evil/.*"}}}}]},
 "blocked-net":{"permissions":[{"any":true}],"principals":[{"directRemoteIp":{"addressPrefix":"10.66.0.0","prefixLen":16}}]},
 "delete-flagged":{"permissions":[{"andRules":{"rules":[
   {"header":{"name":":method","stringMatch":{"exact":"DELETE"}}},
   {"header":{"name":"x-block","presentMatch":true}}]}}],"principals":[{"any":true}]},
 "plain-not-8080":{"permissions":[{"notRule":{"destinationPort":8080}}],
   "principals":[{"notId":{"authenticated":{}}}]},
 "host-suffix":{"permissions":[{"header":{"name":":authority","stringMatch":{"suffix":".internal","ignoreCase":true}}}],"principals":[{"any":true}]}
}}`

const fuzzAllowAll = `{"action":"ALLOW","policies":{"all":{"permissions":[{"any":true}],"principals":[{"any":true}]}}}`

// fuzzShouldDeny is the oracle: the same rules, written directly.
func fuzzShouldDeny(a *Attributes) bool {
	path := a.Path
	if i := strings.IndexAny(path, "?#"); i >= 0 {
		path = path[:i]
	}
	switch {
	case a.Path != "" && strings.HasPrefix(path, "/admin"):
		return true
	case a.Principal != "" && strings.Contains(a.Principal, "/ns/evil/"):
		return true
	case netip.MustParsePrefix("10.66.0.0/16").Contains(a.SourceIP):
		return true
	case a.Method == "DELETE" && len(a.Headers["X-Block"]) > 0:
		return true
	case a.Principal == "" && a.DestinationPort != 8080:
		return true
	case strings.HasSuffix(strings.ToLower(a.Host), ".internal"):
		return true
	}
	return false
}

// FuzzDenyNeverAllowed: whatever the request, one that a DENY rule matches
// is never allowed (with an allow-all ALLOW set after it, and also with the
// sets in the other order), and one no DENY rule matches is allowed.
func FuzzDenyNeverAllowed(f *testing.F) {
	f.Add("spiffe://cluster.local/ns/shop/sa/sleep", []byte{10, 1, 2, 3}, uint16(9080), "reviews", "GET", "/api", false)
	f.Add("spiffe://cluster.local/ns/evil/sa/x", []byte{10, 1, 2, 3}, uint16(9080), "reviews", "GET", "/api", false)
	f.Add("", []byte{10, 66, 0, 1}, uint16(8080), "reviews", "GET", "/", false)
	f.Add("spiffe://td/ns/a/sa/b", []byte{10, 0, 0, 1}, uint16(80), "x.INTERNAL", "DELETE", "/admin?x", true)
	f.Add("spiffe://td/ns/evil/sa/b", []byte{}, uint16(0), "", "", "", false)
	f.Add("spiffe://td\n/ns/evil/sa/b", []byte{10, 0, 0, 1}, uint16(8080), "h", "GET", "/", false)
	allowFirst := compile(f, fuzzAllowAll, fuzzDeny)
	denyFirst := compile(f, fuzzDeny, fuzzAllowAll)
	f.Fuzz(func(t *testing.T, principal string, ip []byte, port uint16, host, method, path string, block bool) {
		a := &Attributes{Principal: principal, DestinationPort: uint32(port), Host: host, Method: method, Path: path}
		if addr, ok := netip.AddrFromSlice(ip); ok {
			a.SourceIP = addr
		}
		if block {
			a.Headers = http.Header{"X-Block": {""}}
		}
		want := fuzzShouldDeny(a)
		for name, e := range map[string]*Engine{"deny,allow": denyFirst, "allow,deny": allowFirst} {
			d := e.Evaluate(a)
			if want && d.Allowed {
				t.Fatalf("%s: a request a DENY rule matches was allowed: %+v → %+v", name, a, d)
			}
			if !want && !d.Allowed {
				t.Fatalf("%s: a request no DENY rule matches was denied: %+v → %+v", name, a, d)
			}
			if want && d.Policy == "" {
				t.Fatalf("%s: denied without naming the DENY policy: %+v", name, a)
			}
		}
	})
}

// benchEngine builds n ALLOW policies shaped like translated Istio rules
// (principal, method and path) and a DENY set of n/10 policies.
func benchEngine(b *testing.B, n int) *Engine {
	var allow, deny []string
	for i := range n {
		allow = append(allow, fmt.Sprintf(`"ns[shop]-policy[p%03d]-rule[0]":{"permissions":[{"andRules":{"rules":[
			{"header":{"name":":method","stringMatch":{"exact":"GET"}}},
			{"urlPath":{"path":{"prefix":"/svc%d/"}}}]}}],
			"principals":[{"andIds":{"ids":[{"authenticated":{"principalName":{"exact":"spiffe://cluster.local/ns/shop/sa/client%d"}}}]}}]}`, i, i, i))
		if i%10 == 0 {
			deny = append(deny, fmt.Sprintf(`"ns[shop]-policy[d%03d]-rule[0]":{"permissions":[{"urlPath":{"path":{"prefix":"/admin%d"}}}],
			"principals":[{"authenticated":{"principalName":{"safeRegex":{"regex":".*/ns/legacy%d/.*"}}}}]}`, i, i, i))
		}
	}
	return compile(b, `{"action":"DENY","policies":{`+strings.Join(deny, ",")+`}}`,
		`{"action":"ALLOW","policies":{`+strings.Join(allow, ",")+`}}`)
}

// BenchmarkEvaluate: one evaluation against n ALLOW policies (plus n/10
// DENY), the request matching the last ALLOW policy by name (the worst
// case that is allowed) or none.
func BenchmarkEvaluate(b *testing.B) {
	for _, n := range []int{10, 100} {
		e := benchEngine(b, n)
		last := n - 1
		match := &Attributes{Principal: fmt.Sprintf("spiffe://cluster.local/ns/shop/sa/client%d", last), SourceIP: netip.MustParseAddr("10.1.2.3"),
			DestinationPort: 9080, Host: "reviews", Method: "GET", Path: fmt.Sprintf("/svc%d/items?id=1", last),
			Headers: http.Header{"User-Agent": {"bench"}}}
		miss := *match
		miss.Principal = "spiffe://cluster.local/ns/shop/sa/nobody"
		for name, a := range map[string]*Attributes{"allowed-last": match, "denied-no-match": &miss} {
			want := a == match
			b.Run(fmt.Sprintf("policies=%d/%s", n, name), func(b *testing.B) {
				b.ReportAllocs()
				for b.Loop() {
					if e.Evaluate(a).Allowed != want {
						b.Fatal("wrong decision")
					}
				}
			})
		}
	}
}
