// Package rbac is the proxy's authorization engine: it compiles Envoy's RBAC
// configuration (envoy.config.rbac.v3.RBAC, as carried by the HTTP and the
// network RBAC filters the control plane puts on the inbound listener, see
// docs/xds.md "Security: RBAC and peer authentication") into matchers, and
// evaluates one request's or connection's attributes against them.
//
// Rule sets are evaluated in order, as Envoy runs its RBAC filters: a DENY
// set denies when one of its policies matches; an ALLOW set denies when none
// matches. A request that passes every set is allowed. Within a set the
// policies are tried in the order of their names (Envoy keeps them in a
// sorted map), so the reported policy is deterministic.
//
// Fields the engine cannot evaluate (metadata, filter state, CEL conditions,
// matcher trees) make Compile fail naming the field; they are never ignored.
package rbac

import (
	"fmt"
	"net/http"
	"net/netip"
	"net/textproto"
	"regexp"
	"slices"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	rbactcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// DeniedStatus and DeniedBody are the HTTP answer to a denied request
// (Envoy's RBAC filter's).
const (
	DeniedStatus = http.StatusForbidden
	DeniedBody   = "RBAC: access denied"
)

// Attributes describe one request (HTTP) or connection (TCP: no method,
// path, host or headers).
type Attributes struct {
	// Principal is the URI SAN of the peer's verified certificate
	// (spiffe://TRUST_DOMAIN/ns/NS/sa/SA); empty on a plain-text connection.
	Principal string
	// SourceIP is the directly connected peer's address.
	SourceIP netip.Addr
	// RemoteIP is the client's address after X-Forwarded-For handling; the
	// zero value means SourceIP.
	RemoteIP netip.Addr
	// DestinationIP and DestinationPort are the original destination.
	DestinationIP   netip.Addr
	DestinationPort uint32
	// ServerName is the TLS SNI, if any.
	ServerName string
	// Host (:authority), Method (:method) and Path (:path, with the query)
	// of an HTTP request.
	Host, Method, Path string
	// Headers are the request's other headers (net/http's canonical keys).
	Headers http.Header
}

// SourceNamespace returns the NS of a principal spiffe://TD/ns/NS/sa/SA, or
// "" when principal is not of that form.
func SourceNamespace(principal string) string {
	rest, ok := strings.CutPrefix(principal, "spiffe://")
	if !ok {
		return ""
	}
	_, rest, ok = strings.Cut(rest, "/ns/")
	if !ok {
		return ""
	}
	ns, _, ok := strings.Cut(rest, "/sa/")
	if !ok || ns == "" || strings.Contains(ns, "/") {
		return ""
	}
	return ns
}

// Decision is the outcome of Evaluate.
type Decision struct {
	// Allowed is the verdict.
	Allowed bool
	// Policy is the policy that decided: the DENY policy that matched, or
	// the ALLOW policy that matched last; empty when a request was denied
	// because no ALLOW policy matched, or allowed with no rules at all.
	Policy string
}

// Engine is a compiled, immutable list of rule sets; safe for concurrent
// use. A nil *Engine allows everything.
type Engine struct {
	sets []ruleSet
}

type ruleSet struct {
	deny     bool
	policies []policy
}

type policy struct {
	name  string
	perms []matcher // OR
	prins []matcher // OR
}

type matcher func(*Attributes) bool

// CompileHTTP compiles the configs of the HTTP RBAC filters of one chain,
// in filter order.
func CompileHTTP(filters ...*rbachttpv3.RBAC) (*Engine, error) {
	var rules []*rbacv3.RBAC
	for i, f := range filters {
		if f.GetMatcher() != nil {
			return nil, fmt.Errorf("rbac filter %d: matcher: not supported (use rules)", i)
		}
		if f.GetRules() == nil {
			continue // no rules: the filter lets everything through
		}
		rules = append(rules, f.GetRules())
	}
	return Compile(rules...)
}

// CompileNetwork compiles the configs of the network RBAC filters of one
// chain, in filter order.
func CompileNetwork(filters ...*rbactcpv3.RBAC) (*Engine, error) {
	var rules []*rbacv3.RBAC
	for i, f := range filters {
		if f.GetMatcher() != nil {
			return nil, fmt.Errorf("rbac filter %d: matcher: not supported (use rules)", i)
		}
		if f.GetEnforcementType() != rbactcpv3.RBAC_ONE_TIME_ON_FIRST_BYTE {
			return nil, fmt.Errorf("rbac filter %d: enforcement_type: %s is not supported", i, f.GetEnforcementType())
		}
		if f.GetRules() == nil {
			continue
		}
		rules = append(rules, f.GetRules())
	}
	return Compile(rules...)
}

// Compile compiles rule sets, evaluated in the given order.
func Compile(sets ...*rbacv3.RBAC) (*Engine, error) {
	e := &Engine{}
	for i, r := range sets {
		rs := ruleSet{}
		switch r.GetAction() {
		case rbacv3.RBAC_ALLOW:
		case rbacv3.RBAC_DENY:
			rs.deny = true
		default:
			return nil, fmt.Errorf("rules %d: action: %s is not supported", i, r.GetAction())
		}
		names := make([]string, 0, len(r.GetPolicies()))
		for n := range r.GetPolicies() {
			names = append(names, n)
		}
		slices.Sort(names)
		for _, n := range names {
			p, err := compilePolicy(r.GetPolicies()[n])
			if err != nil {
				return nil, fmt.Errorf("rules %d: policies[%s]: %w", i, n, err)
			}
			p.name = n
			rs.policies = append(rs.policies, p)
		}
		e.sets = append(e.sets, rs)
	}
	return e, nil
}

// Evaluate decides one request or connection.
func (e *Engine) Evaluate(a *Attributes) Decision {
	if e == nil {
		return Decision{Allowed: true}
	}
	d := Decision{Allowed: true}
	for i := range e.sets {
		s := &e.sets[i]
		name, ok := s.match(a)
		switch {
		case s.deny && ok:
			return Decision{Policy: name}
		case !s.deny && !ok:
			return Decision{}
		case !s.deny:
			d.Policy = name
		}
	}
	return d
}

// Empty reports whether the engine has no rule sets (it allows everything).
func (e *Engine) Empty() bool { return e == nil || len(e.sets) == 0 }

func (s *ruleSet) match(a *Attributes) (string, bool) {
	for i := range s.policies {
		p := &s.policies[i]
		if anyMatch(p.perms, a) && anyMatch(p.prins, a) {
			return p.name, true
		}
	}
	return "", false
}

func anyMatch(ms []matcher, a *Attributes) bool {
	for _, m := range ms {
		if m(a) {
			return true
		}
	}
	return false
}

func allMatch(ms []matcher, a *Attributes) bool {
	for _, m := range ms {
		if !m(a) {
			return false
		}
	}
	return true
}

func compilePolicy(p *rbacv3.Policy) (policy, error) {
	if p.GetCondition() != nil || p.GetCheckedCondition() != nil {
		return policy{}, fmt.Errorf("condition: CEL conditions are not supported")
	}
	if len(p.GetPermissions()) == 0 || len(p.GetPrincipals()) == 0 {
		return policy{}, fmt.Errorf("a policy needs at least one permission and one principal")
	}
	var out policy
	for i, pm := range p.GetPermissions() {
		m, err := compilePermission(pm)
		if err != nil {
			return policy{}, fmt.Errorf("permissions[%d]: %w", i, err)
		}
		out.perms = append(out.perms, m)
	}
	for i, pr := range p.GetPrincipals() {
		m, err := compilePrincipal(pr)
		if err != nil {
			return policy{}, fmt.Errorf("principals[%d]: %w", i, err)
		}
		out.prins = append(out.prins, m)
	}
	return out, nil
}

func compilePermissions(ps []*rbacv3.Permission, field string) ([]matcher, error) {
	var out []matcher
	for i, p := range ps {
		m, err := compilePermission(p)
		if err != nil {
			return nil, fmt.Errorf("%s[%d]: %w", field, i, err)
		}
		out = append(out, m)
	}
	return out, nil
}

func compilePermission(p *rbacv3.Permission) (matcher, error) {
	switch r := p.GetRule().(type) {
	case *rbacv3.Permission_Any:
		if !r.Any {
			return nil, fmt.Errorf("any: false is not a valid rule")
		}
		return func(*Attributes) bool { return true }, nil
	case *rbacv3.Permission_AndRules:
		ms, err := compilePermissions(r.AndRules.GetRules(), "and_rules.rules")
		if err != nil {
			return nil, err
		}
		return func(a *Attributes) bool { return allMatch(ms, a) }, nil
	case *rbacv3.Permission_OrRules:
		ms, err := compilePermissions(r.OrRules.GetRules(), "or_rules.rules")
		if err != nil {
			return nil, err
		}
		return func(a *Attributes) bool { return anyMatch(ms, a) }, nil
	case *rbacv3.Permission_NotRule:
		m, err := compilePermission(r.NotRule)
		if err != nil {
			return nil, fmt.Errorf("not_rule: %w", err)
		}
		return func(a *Attributes) bool { return !m(a) }, nil
	case *rbacv3.Permission_Header:
		m, err := compileHeader(r.Header)
		if err != nil {
			return nil, fmt.Errorf("header: %w", err)
		}
		return m, nil
	case *rbacv3.Permission_UrlPath:
		sm, err := compileString(r.UrlPath.GetPath())
		if err != nil {
			return nil, fmt.Errorf("url_path.path: %w", err)
		}
		return func(a *Attributes) bool {
			if a.Path == "" {
				return false // not an HTTP request
			}
			return sm(pathOnly(a.Path))
		}, nil
	case *rbacv3.Permission_DestinationIp:
		pfx, err := cidr(r.DestinationIp)
		if err != nil {
			return nil, fmt.Errorf("destination_ip: %w", err)
		}
		return func(a *Attributes) bool { return pfx.Contains(a.DestinationIP) }, nil
	case *rbacv3.Permission_DestinationPort:
		port := r.DestinationPort
		return func(a *Attributes) bool { return a.DestinationPort == port }, nil
	case *rbacv3.Permission_DestinationPortRange:
		lo, hi := uint32(r.DestinationPortRange.GetStart()), uint32(r.DestinationPortRange.GetEnd())
		return func(a *Attributes) bool { return a.DestinationPort >= lo && a.DestinationPort < hi }, nil
	case *rbacv3.Permission_RequestedServerName:
		sm, err := compileString(r.RequestedServerName)
		if err != nil {
			return nil, fmt.Errorf("requested_server_name: %w", err)
		}
		return func(a *Attributes) bool { return sm(a.ServerName) }, nil
	case nil:
		return nil, fmt.Errorf("rule: not set")
	default:
		return nil, fmt.Errorf("%s: not supported", fieldName(p))
	}
}

func compilePrincipals(ps []*rbacv3.Principal, field string) ([]matcher, error) {
	var out []matcher
	for i, p := range ps {
		m, err := compilePrincipal(p)
		if err != nil {
			return nil, fmt.Errorf("%s[%d]: %w", field, i, err)
		}
		out = append(out, m)
	}
	return out, nil
}

func compilePrincipal(p *rbacv3.Principal) (matcher, error) {
	switch id := p.GetIdentifier().(type) {
	case *rbacv3.Principal_Any:
		if !id.Any {
			return nil, fmt.Errorf("any: false is not a valid identifier")
		}
		return func(*Attributes) bool { return true }, nil
	case *rbacv3.Principal_AndIds:
		ms, err := compilePrincipals(id.AndIds.GetIds(), "and_ids.ids")
		if err != nil {
			return nil, err
		}
		return func(a *Attributes) bool { return allMatch(ms, a) }, nil
	case *rbacv3.Principal_OrIds:
		ms, err := compilePrincipals(id.OrIds.GetIds(), "or_ids.ids")
		if err != nil {
			return nil, err
		}
		return func(a *Attributes) bool { return anyMatch(ms, a) }, nil
	case *rbacv3.Principal_NotId:
		m, err := compilePrincipal(id.NotId)
		if err != nil {
			return nil, fmt.Errorf("not_id: %w", err)
		}
		return func(a *Attributes) bool { return !m(a) }, nil
	case *rbacv3.Principal_Authenticated_:
		if id.Authenticated.GetPrincipalName() == nil {
			return func(a *Attributes) bool { return a.Principal != "" }, nil
		}
		sm, err := compileString(id.Authenticated.GetPrincipalName())
		if err != nil {
			return nil, fmt.Errorf("authenticated.principal_name: %w", err)
		}
		return func(a *Attributes) bool { return a.Principal != "" && sm(a.Principal) }, nil
	case *rbacv3.Principal_DirectRemoteIp:
		pfx, err := cidr(id.DirectRemoteIp)
		if err != nil {
			return nil, fmt.Errorf("direct_remote_ip: %w", err)
		}
		return func(a *Attributes) bool { return pfx.Contains(a.SourceIP) }, nil
	case *rbacv3.Principal_SourceIp: //nolint:staticcheck // deprecated alias of direct_remote_ip, still sent by some control planes
		pfx, err := cidr(id.SourceIp)
		if err != nil {
			return nil, fmt.Errorf("source_ip: %w", err)
		}
		return func(a *Attributes) bool { return pfx.Contains(a.SourceIP) }, nil
	case *rbacv3.Principal_RemoteIp:
		pfx, err := cidr(id.RemoteIp)
		if err != nil {
			return nil, fmt.Errorf("remote_ip: %w", err)
		}
		return func(a *Attributes) bool {
			ip := a.RemoteIP
			if !ip.IsValid() {
				ip = a.SourceIP
			}
			return pfx.Contains(ip)
		}, nil
	case *rbacv3.Principal_Header:
		m, err := compileHeader(id.Header)
		if err != nil {
			return nil, fmt.Errorf("header: %w", err)
		}
		return m, nil
	case *rbacv3.Principal_UrlPath:
		sm, err := compileString(id.UrlPath.GetPath())
		if err != nil {
			return nil, fmt.Errorf("url_path.path: %w", err)
		}
		return func(a *Attributes) bool { return a.Path != "" && sm(pathOnly(a.Path)) }, nil
	case nil:
		return nil, fmt.Errorf("identifier: not set")
	default:
		return nil, fmt.Errorf("%s: not supported", fieldName(p))
	}
}

// fieldName names the set oneof field of a Permission or Principal.
func fieldName(m proto.Message) string {
	var name string
	m.ProtoReflect().Range(func(fd protoreflect.FieldDescriptor, _ protoreflect.Value) bool {
		name = string(fd.Name())
		return false
	})
	return name
}

func cidr(c *corev3.CidrRange) (netip.Prefix, error) {
	a, err := netip.ParseAddr(c.GetAddressPrefix())
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("address_prefix %q: not an IP address", c.GetAddressPrefix())
	}
	bits := a.BitLen()
	if c.GetPrefixLen() != nil {
		bits = int(c.GetPrefixLen().GetValue())
	}
	p, err := a.Prefix(bits)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("prefix_len %d: %w", bits, err)
	}
	return p, nil
}

// pathOnly strips the query and fragment (url_path matches the path alone).
func pathOnly(p string) string {
	for i := 0; i < len(p); i++ {
		if p[i] == '?' || p[i] == '#' {
			return p[:i]
		}
	}
	return p
}

type stringFunc func(string) bool

func compileString(m *matcherv3.StringMatcher) (stringFunc, error) {
	if m == nil {
		return nil, fmt.Errorf("not set")
	}
	ic := m.GetIgnoreCase()
	switch p := m.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		s := p.Exact
		if ic {
			return func(v string) bool { return strings.EqualFold(v, s) }, nil
		}
		return func(v string) bool { return v == s }, nil
	case *matcherv3.StringMatcher_Prefix:
		s := p.Prefix
		if ic {
			return func(v string) bool { return len(v) >= len(s) && strings.EqualFold(v[:len(s)], s) }, nil
		}
		return func(v string) bool { return strings.HasPrefix(v, s) }, nil
	case *matcherv3.StringMatcher_Suffix:
		s := p.Suffix
		if ic {
			return func(v string) bool { return len(v) >= len(s) && strings.EqualFold(v[len(v)-len(s):], s) }, nil
		}
		return func(v string) bool { return strings.HasSuffix(v, s) }, nil
	case *matcherv3.StringMatcher_Contains:
		s := p.Contains
		if ic {
			ls := strings.ToLower(s)
			return func(v string) bool { return strings.Contains(strings.ToLower(v), ls) }, nil
		}
		return func(v string) bool { return strings.Contains(v, s) }, nil
	case *matcherv3.StringMatcher_SafeRegex:
		if ic {
			return nil, fmt.Errorf("ignore_case: not valid with safe_regex")
		}
		re, err := fullRegexp(p.SafeRegex.GetRegex())
		if err != nil {
			return nil, fmt.Errorf("safe_regex: %w", err)
		}
		return re.MatchString, nil
	default:
		return nil, fmt.Errorf("match_pattern: not supported")
	}
}

// fullRegexp compiles an RE2 pattern that must match the whole value, as
// Envoy's safe_regex does. "." also matches a newline ((?s)): a value with
// a line break (a forged principal, a folded header) must not slip past a
// DENY rule such as ".*/ns/evil/.*".
func fullRegexp(re string) (*regexp.Regexp, error) {
	return regexp.Compile(`(?s)^(?:` + re + `)$`)
}

// headerValue returns a request header as Envoy's matchers see it: pseudo
// headers from the request line, several values joined with ",".
func headerValue(a *Attributes, key, name string) (string, bool) {
	switch name {
	case ":method":
		return a.Method, a.Method != ""
	case ":authority", "host":
		return a.Host, a.Host != ""
	case ":path":
		return a.Path, a.Path != ""
	}
	vs := a.Headers[key]
	switch len(vs) {
	case 0:
		return "", false
	case 1:
		return vs[0], true
	}
	return strings.Join(vs, ","), true
}

func compileHeader(h *routev3.HeaderMatcher) (matcher, error) {
	name := strings.ToLower(h.GetName())
	if name == "" {
		return nil, fmt.Errorf("name: must not be empty")
	}
	key := textproto.CanonicalMIMEHeaderKey(name)
	invert, missingEmpty := h.GetInvertMatch(), h.GetTreatMissingHeaderAsEmpty()
	var value stringFunc
	present := false
	isPresent := false
	switch s := h.GetHeaderMatchSpecifier().(type) {
	case *routev3.HeaderMatcher_PresentMatch:
		isPresent, present = true, s.PresentMatch
	case *routev3.HeaderMatcher_StringMatch:
		f, err := compileString(s.StringMatch)
		if err != nil {
			return nil, fmt.Errorf("string_match: %w", err)
		}
		value = f
	case *routev3.HeaderMatcher_ExactMatch:
		v := s.ExactMatch
		value = func(x string) bool { return x == v }
	case *routev3.HeaderMatcher_PrefixMatch:
		v := s.PrefixMatch
		value = func(x string) bool { return strings.HasPrefix(x, v) }
	case *routev3.HeaderMatcher_SuffixMatch:
		v := s.SuffixMatch
		value = func(x string) bool { return strings.HasSuffix(x, v) }
	case *routev3.HeaderMatcher_ContainsMatch:
		v := s.ContainsMatch
		value = func(x string) bool { return strings.Contains(x, v) }
	case *routev3.HeaderMatcher_SafeRegexMatch:
		re, err := fullRegexp(s.SafeRegexMatch.GetRegex())
		if err != nil {
			return nil, fmt.Errorf("safe_regex_match: %w", err)
		}
		value = re.MatchString
	case nil:
		// No specifier: Envoy matches when the header is present.
		isPresent, present = true, true
	default:
		return nil, fmt.Errorf("header_match_specifier: not supported")
	}
	return func(a *Attributes) bool {
		v, ok := headerValue(a, key, name)
		if !ok && !missingEmpty {
			if invert {
				return !isPresent
			}
			return isPresent && !present
		}
		var m bool
		if isPresent {
			m = present
		} else {
			m = value(v)
		}
		return m != invert
	}, nil
}
