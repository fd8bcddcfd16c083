package translate

import (
	"cmp"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	rbachttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	rbactcpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/rbac/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
	security "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
)

// DefaultRootNamespace is Istio's default root namespace: policies there
// apply to the whole mesh.
const DefaultRootNamespace = "istio-system"

// Envoy filter names of the RBAC filters.
const (
	HTTPRBACFilterName    = "envoy.filters.http.rbac"
	NetworkRBACFilterName = "envoy.filters.network.rbac"
)

// SecurityInputs are the security.istio.io objects the security
// translation reads. The slices are read only.
type SecurityInputs struct {
	AuthorizationPolicies []*securityv1.AuthorizationPolicy
	PeerAuthentications   []*securityv1.PeerAuthentication
	// RootNamespace holds mesh-wide policies (default DefaultRootNamespace).
	RootNamespace string
}

// AddObjects sorts the security objects into in; other kinds are returned.
func (in *SecurityInputs) AddObjects(objs ...runtime.Object) []runtime.Object {
	var rest []runtime.Object
	for _, o := range objs {
		switch t := o.(type) {
		case *securityv1.AuthorizationPolicy:
			in.AuthorizationPolicies = append(in.AuthorizationPolicies, t)
		case *securityv1.PeerAuthentication:
			in.PeerAuthentications = append(in.PeerAuthentications, t)
		default:
			rest = append(rest, o)
		}
	}
	return rest
}

// MTLSMode is the inbound mutual TLS mode of a port.
type MTLSMode string

// The PeerAuthentication modes.
const (
	MTLSPermissive MTLSMode = "PERMISSIVE"
	MTLSStrict     MTLSMode = "STRICT"
	MTLSDisable    MTLSMode = "DISABLE"
)

// SecurityMesh is the compiled, validated form of a set of SecurityInputs.
type SecurityMesh struct {
	root     string
	policies []*authzPolicy
	peers    []*securityv1.PeerAuthentication
	warnings []Warning
}

// authzPolicy is one AuthorizationPolicy with its rules translated for
// HTTP and TCP chains. A nil entry is a rule dropped on that chain type.
type authzPolicy struct {
	obj *securityv1.AuthorizationPolicy
	// deny: the rules go into the DENY set (DENY, and refused CUSTOM).
	deny bool
	// skip: the policy has no effect on a sidecar (AUDIT, targetRefs).
	skip  bool
	names []string
	http  []*rbacv3.Policy
	tcp   []*rbacv3.Policy
}

// Security is the inbound security configuration of one proxy.
type Security struct {
	// HTTP are the RBAC configs for the inbound HTTP filter chains, in
	// filter order (DENY, then ALLOW); none: no RBAC filter.
	HTTP []*rbachttpv3.RBAC
	// TCP are the same rules for the inbound TCP filter chains.
	TCP []*rbactcpv3.RBAC
	// Mode is the proxy's PeerAuthentication mode; Ports overrides it per
	// container port.
	Mode  MTLSMode
	Ports map[uint32]MTLSMode
}

// ModeFor returns the mTLS mode of an inbound (container) port.
func (s *Security) ModeFor(port uint32) MTLSMode {
	if m, ok := s.Ports[port]; ok {
		return m
	}
	return s.Mode
}

// HTTPFilters returns the RBAC HTTP filters to put before the router on
// every inbound HTTP filter chain.
func (s *Security) HTTPFilters() []*hcmv3.HttpFilter {
	var out []*hcmv3.HttpFilter
	for _, r := range s.HTTP {
		out = append(out, &hcmv3.HttpFilter{Name: HTTPRBACFilterName,
			ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(r)}})
	}
	return out
}

// NetworkFilters returns the RBAC network filters to put before tcp_proxy on
// every inbound TCP filter chain.
func (s *Security) NetworkFilters() []*listenerv3.Filter {
	var out []*listenerv3.Filter
	for _, r := range s.TCP {
		out = append(out, &listenerv3.Filter{Name: NetworkRBACFilterName,
			ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(r)}})
	}
	return out
}

// Warnings returns the refusals of CompileSecurity, sorted.
func (m *SecurityMesh) Warnings() []Warning { return m.warnings }

// The fields of an AuthorizationPolicy the translation reads. Anything else
// set is refused naming the field.
var (
	authzSpecFields = paths("selector.matchLabels", "action", "provider.name")
	authzRuleFields = paths(
		"from.source.{principals,notPrincipals,namespaces,notNamespaces,ipBlocks,notIpBlocks,remoteIpBlocks,notRemoteIpBlocks}",
		"to.operation.{hosts,notHosts,ports,notPorts,methods,notMethods,paths,notPaths}",
		"when.{key,values,notValues}")
	peerSpecFields = paths("selector.matchLabels", "mtls.mode", "portLevelMtls.*.mode")
)

// CompileSecurity validates and translates every policy of in once; the
// refusals are in Warnings.
func CompileSecurity(in *SecurityInputs) *SecurityMesh {
	m := &SecurityMesh{root: cmp.Or(in.RootNamespace, DefaultRootNamespace)}
	for _, ap := range sortedObjs(in.AuthorizationPolicies) {
		m.policies = append(m.policies, m.compilePolicy(ap))
	}
	for _, pa := range sortedObjs(in.PeerAuthentications) {
		if m.compilePeer(pa) {
			m.peers = append(m.peers, pa)
		}
	}
	slices.SortFunc(m.warnings, func(a, b Warning) int { return strings.Compare(a.String(), b.String()) })
	return m
}

func (m *SecurityMesh) warn(kind string, obj metav1.Object, reason, format string, a ...any) {
	m.warnings = append(m.warnings, Warning{Kind: kind, Namespace: obj.GetNamespace(), Name: obj.GetName(), UID: string(obj.GetUID()),
		Reason: reason, Message: fmt.Sprintf(format, a...)})
}

// RBACPolicyName is the Envoy policy name of rule i of a policy (Istio's).
func RBACPolicyName(ns, name string, i int) string {
	return fmt.Sprintf("ns[%s]-policy[%s]-rule[%d]", ns, name, i)
}

func (m *SecurityMesh) compilePolicy(ap *securityv1.AuthorizationPolicy) *authzPolicy {
	const kind = "AuthorizationPolicy"
	p := &authzPolicy{obj: ap}
	warn := func(reason, format string, a ...any) { m.warn(kind, ap, reason, format, a...) }
	spec := &ap.Spec
	// Rules are walked one by one below; targetRefs are handled as a whole.
	top := proto.CloneOf(spec)
	top.Rules, top.TargetRef, top.TargetRefs = nil, nil, nil
	for _, f := range unsupportedFields(top, authzSpecFields) {
		warn(ReasonUnsupported, "%s: not supported", f)
	}
	switch spec.Action {
	case security.AuthorizationPolicy_ALLOW:
	case security.AuthorizationPolicy_DENY:
		p.deny = true
	case security.AuthorizationPolicy_CUSTOM:
		warn(ReasonUnsupported, "spec.action: CUSTOM action is not supported; the requests its rules match are denied")
		p.deny = true
	case security.AuthorizationPolicy_AUDIT:
		warn(ReasonUnsupported, "spec.action: AUDIT action is not supported; the policy is not applied (it never changes a decision)")
		p.skip = true
		return p
	default:
		warn(ReasonInvalid, "spec.action: %d is not a known action; everything the policy selects is denied", spec.Action)
		p.deny = true
		p.names = []string{RBACPolicyName(ap.Namespace, ap.Name, 0)}
		all := &rbacv3.Policy{Permissions: []*rbacv3.Permission{permAny()}, Principals: []*rbacv3.Principal{prinAny()}}
		p.http, p.tcp = []*rbacv3.Policy{all}, []*rbacv3.Policy{all}
		return p
	}
	if spec.GetProvider() != nil && spec.Action != security.AuthorizationPolicy_CUSTOM {
		warn(ReasonInvalid, "spec.provider: only valid with action CUSTOM")
	}
	if spec.TargetRef != nil || len(spec.TargetRefs) > 0 {
		warn(ReasonUnsupported, "spec.targetRefs: policies attached to a gateway or waypoint do not apply to sidecars; not applied")
		p.skip = true
		return p
	}
	for i, r := range spec.Rules {
		name := RBACPolicyName(ap.Namespace, ap.Name, i)
		rw := &ruleWriter{path: fmt.Sprintf("spec.rules[%d]", i), deny: p.deny}
		var unsupported []string
		walkSet(r.ProtoReflect(), "", rw.path, authzRuleFields, &unsupported)
		for _, f := range unsupported {
			rw.problem(ReasonUnsupported, "%s: not supported", f)
		}
		rw.rule(r)
		for _, pr := range rw.problems {
			warn(pr.reason, "%s", pr.msg+rw.consequence())
		}
		if !p.deny && len(rw.problems) > 0 {
			continue // an ALLOW rule that cannot be honoured allows nothing
		}
		p.names = append(p.names, name)
		p.http = append(p.http, rw.policy(false))
		p.tcp = append(p.tcp, rw.policy(true))
	}
	return p
}

type problem struct{ reason, msg string }

// cond is one translated condition: a permission (destination side) or a
// principal (source side).
type cond struct {
	perm     *rbacv3.Permission
	prin     *rbacv3.Principal
	httpOnly bool
}

// ruleWriter translates one rule. Conditions it cannot translate are left
// out and recorded as problems.
type ruleWriter struct {
	path     string
	deny     bool
	problems []problem
	from     [][]cond
	to       [][]cond
	when     []cond
}

func (w *ruleWriter) problem(reason, format string, a ...any) {
	w.problems = append(w.problems, problem{reason, fmt.Sprintf(format, a...)})
}

func (w *ruleWriter) consequence() string {
	if w.deny {
		return " (the condition is left out: the rule denies more)"
	}
	return " (the rule is dropped: it allows nothing)"
}

func (w *ruleWriter) rule(r *security.Rule) {
	for i, f := range r.From {
		src := f.GetSource()
		p := fmt.Sprintf("%s.from[%d].source", w.path, i)
		var cs []cond
		cs = w.values(cs, p+".principals", src.GetPrincipals(), false, principalMatcher)
		cs = w.values(cs, p+".notPrincipals", src.GetNotPrincipals(), true, principalMatcher)
		cs = w.values(cs, p+".namespaces", src.GetNamespaces(), false, namespaceMatcher)
		cs = w.values(cs, p+".notNamespaces", src.GetNotNamespaces(), true, namespaceMatcher)
		cs = w.values(cs, p+".ipBlocks", src.GetIpBlocks(), false, directIPMatcher)
		cs = w.values(cs, p+".notIpBlocks", src.GetNotIpBlocks(), true, directIPMatcher)
		cs = w.values(cs, p+".remoteIpBlocks", src.GetRemoteIpBlocks(), false, remoteIPMatcher)
		cs = w.values(cs, p+".notRemoteIpBlocks", src.GetNotRemoteIpBlocks(), true, remoteIPMatcher)
		w.from = append(w.from, cs)
	}
	for i, t := range r.To {
		op := t.GetOperation()
		p := fmt.Sprintf("%s.to[%d].operation", w.path, i)
		var cs []cond
		cs = w.values(cs, p+".hosts", op.GetHosts(), false, hostMatcher)
		cs = w.values(cs, p+".notHosts", op.GetNotHosts(), true, hostMatcher)
		cs = w.values(cs, p+".ports", op.GetPorts(), false, portMatcher)
		cs = w.values(cs, p+".notPorts", op.GetNotPorts(), true, portMatcher)
		cs = w.values(cs, p+".methods", op.GetMethods(), false, methodMatcher)
		cs = w.values(cs, p+".notMethods", op.GetNotMethods(), true, methodMatcher)
		cs = w.values(cs, p+".paths", op.GetPaths(), false, pathMatcher)
		cs = w.values(cs, p+".notPaths", op.GetNotPaths(), true, pathMatcher)
		w.to = append(w.to, cs)
	}
	for i, c := range r.When {
		p := fmt.Sprintf("%s.when[%d]", w.path, i)
		tr := conditionMatcher(c.Key)
		if tr == nil {
			w.problem(ReasonUnsupported, "%s.key: %q is not supported (supported: request.headers[NAME], source.principal, source.namespace, source.ip, remote.ip, destination.port)", p, c.Key)
			continue
		}
		if len(c.Values) == 0 && len(c.NotValues) == 0 {
			w.problem(ReasonInvalid, "%s: key %q has neither values nor notValues", p, c.Key)
			continue
		}
		w.when = w.values(w.when, p+".values", c.Values, false, tr)
		w.when = w.values(w.when, p+".notValues", c.NotValues, true, tr)
	}
}

// matcherFunc translates one value into a condition, or says why it cannot.
type matcherFunc func(v string) (cond, error)

// values ORs the translations of vals (negated for a not-field) and appends
// the result to cs. An invalid value is a problem and leaves the whole field
// out: that drops an ALLOW rule and widens a DENY rule, where dropping only
// the value from the OR would narrow the DENY.
func (w *ruleWriter) values(cs []cond, path string, vals []string, not bool, f matcherFunc) []cond {
	if len(vals) == 0 {
		return cs
	}
	var perms []*rbacv3.Permission
	var prins []*rbacv3.Principal
	httpOnly := false
	invalid := false
	for i, v := range vals {
		c, err := f(v)
		if err != nil {
			w.problem(ReasonInvalid, "%s[%d]: %q: %v", path, i, v, err)
			invalid = true
			continue
		}
		httpOnly = c.httpOnly
		if c.perm != nil {
			perms = append(perms, c.perm)
		} else {
			prins = append(prins, c.prin)
		}
	}
	switch {
	case invalid:
		return cs
	case len(perms) > 0:
		p := perms[0]
		if len(perms) > 1 {
			p = &rbacv3.Permission{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: perms}}}
		}
		if not {
			p = &rbacv3.Permission{Rule: &rbacv3.Permission_NotRule{NotRule: p}}
		}
		return append(cs, cond{perm: p, httpOnly: httpOnly})
	case len(prins) > 0:
		p := prins[0]
		if len(prins) > 1 {
			p = &rbacv3.Principal{Identifier: &rbacv3.Principal_OrIds{OrIds: &rbacv3.Principal_Set{Ids: prins}}}
		}
		if not {
			p = &rbacv3.Principal{Identifier: &rbacv3.Principal_NotId{NotId: p}}
		}
		return append(cs, cond{prin: p, httpOnly: httpOnly})
	}
	return cs
}

// policy builds the Envoy policy of the rule. For a TCP chain the HTTP-only
// conditions are left out of a DENY rule (it denies more, as Istio) and make
// an ALLOW rule match nothing (nil is returned).
func (w *ruleWriter) policy(tcp bool) *rbacv3.Policy {
	keep := func(cs []cond) ([]cond, bool) {
		if !tcp {
			return cs, true
		}
		var out []cond
		for _, c := range cs {
			if c.httpOnly {
				if !w.deny {
					return nil, false
				}
				continue
			}
			out = append(out, c)
		}
		return out, true
	}
	when, ok := keep(w.when)
	if !ok {
		return nil
	}
	var whenPerms []*rbacv3.Permission
	var whenPrins []*rbacv3.Principal
	for _, c := range when {
		if c.perm != nil {
			whenPerms = append(whenPerms, c.perm)
		} else {
			whenPrins = append(whenPrins, c.prin)
		}
	}
	pol := &rbacv3.Policy{}
	tos := w.to
	if len(tos) == 0 {
		tos = [][]cond{nil}
	}
	for _, t := range tos {
		t, ok := keep(t)
		if !ok {
			continue // this operation cannot match a connection
		}
		rules := slices.Clone(whenPerms)
		for _, c := range t {
			rules = append(rules, c.perm)
		}
		pol.Permissions = append(pol.Permissions, andPerms(rules))
	}
	if len(pol.Permissions) == 0 {
		return nil
	}
	froms := w.from
	if len(froms) == 0 {
		froms = [][]cond{nil}
	}
	for _, f := range froms {
		ids := slices.Clone(whenPrins)
		for _, c := range f {
			ids = append(ids, c.prin)
		}
		pol.Principals = append(pol.Principals, andPrins(ids))
	}
	return pol
}

func permAny() *rbacv3.Permission { return &rbacv3.Permission{Rule: &rbacv3.Permission_Any{Any: true}} }
func prinAny() *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Any{Any: true}}
}

func andPerms(rules []*rbacv3.Permission) *rbacv3.Permission {
	if len(rules) == 0 {
		return permAny()
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: rules}}}
}

func andPrins(ids []*rbacv3.Principal) *rbacv3.Principal {
	if len(ids) == 0 {
		return prinAny()
	}
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_AndIds{AndIds: &rbacv3.Principal_Set{Ids: ids}}}
}

// wildcard splits an Istio match value: exact, "x*" prefix, "*x" suffix or
// "*" any. A "*" anywhere else is an error.
func wildcard(v string) (kind, s string, err error) {
	switch {
	case v == "":
		return "", "", fmt.Errorf("must not be empty")
	case v == "*":
		return "any", "", nil
	case strings.HasPrefix(v, "*") && !strings.Contains(v[1:], "*"):
		return "suffix", v[1:], nil
	case strings.HasSuffix(v, "*") && !strings.Contains(v[:len(v)-1], "*"):
		return "prefix", v[:len(v)-1], nil
	case strings.Contains(v, "*"):
		return "", "", fmt.Errorf("a wildcard * is allowed only at the start or the end")
	}
	return "exact", v, nil
}

func stringMatch(kind, s string, ignoreCase bool) *matcherv3.StringMatcher {
	m := &matcherv3.StringMatcher{IgnoreCase: ignoreCase}
	switch kind {
	case "prefix":
		m.MatchPattern = &matcherv3.StringMatcher_Prefix{Prefix: s}
	case "suffix":
		m.MatchPattern = &matcherv3.StringMatcher_Suffix{Suffix: s}
	default:
		m.MatchPattern = &matcherv3.StringMatcher_Exact{Exact: s}
	}
	return m
}

func regexMatch(re string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: re}}}
}

func authenticated(m *matcherv3.StringMatcher) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: m}}}
}

func principalMatcher(v string) (cond, error) {
	kind, s, err := wildcard(v)
	if err != nil {
		return cond{}, err
	}
	switch kind {
	case "any":
		return cond{prin: authenticated(regexMatch(".+"))}, nil
	case "suffix":
		return cond{prin: authenticated(stringMatch(kind, s, false))}, nil
	}
	return cond{prin: authenticated(stringMatch(kind, "spiffe://"+s, false))}, nil
}

func namespaceMatcher(v string) (cond, error) {
	kind, s, err := wildcard(v)
	if err != nil {
		return cond{}, err
	}
	if strings.Contains(s, "/") {
		return cond{}, fmt.Errorf("a namespace has no /")
	}
	q := regexp.QuoteMeta(s)
	switch kind {
	case "any":
		q = "[^/]+"
	case "prefix":
		q += "[^/]*"
	case "suffix":
		q = "[^/]*" + q
	}
	return cond{prin: authenticated(regexMatch(".*/ns/" + q + "/.*"))}, nil
}

func cidr(v string) (*corev3.CidrRange, error) {
	pfx, err := netip.ParsePrefix(v)
	if err != nil {
		a, aerr := netip.ParseAddr(v)
		if aerr != nil {
			return nil, fmt.Errorf("not an IP address or CIDR block")
		}
		pfx = netip.PrefixFrom(a, a.BitLen())
	}
	return &corev3.CidrRange{AddressPrefix: pfx.Masked().Addr().String(), PrefixLen: wrapperspb.UInt32(uint32(pfx.Bits()))}, nil
}

func directIPMatcher(v string) (cond, error) {
	c, err := cidr(v)
	if err != nil {
		return cond{}, err
	}
	return cond{prin: &rbacv3.Principal{Identifier: &rbacv3.Principal_DirectRemoteIp{DirectRemoteIp: c}}}, nil
}

func remoteIPMatcher(v string) (cond, error) {
	c, err := cidr(v)
	if err != nil {
		return cond{}, err
	}
	return cond{prin: &rbacv3.Principal{Identifier: &rbacv3.Principal_RemoteIp{RemoteIp: c}}}, nil
}

func headerPerm(name string, m *matcherv3.StringMatcher) *rbacv3.Permission {
	return &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{Name: name,
		HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: m}}}}
}

func hostMatcher(v string) (cond, error) {
	kind, s, err := wildcard(v)
	if err != nil {
		return cond{}, err
	}
	if kind == "any" {
		return cond{perm: permAny(), httpOnly: true}, nil
	}
	return cond{perm: headerPerm(":authority", stringMatch(kind, s, true)), httpOnly: true}, nil
}

func methodMatcher(v string) (cond, error) {
	if v == "*" {
		return cond{perm: permAny(), httpOnly: true}, nil
	}
	if v == "" || strings.ContainsAny(v, "* \t") {
		return cond{}, fmt.Errorf("not an HTTP method")
	}
	return cond{perm: headerPerm(":method", stringMatch("exact", v, false)), httpOnly: true}, nil
}

func pathMatcher(v string) (cond, error) {
	if strings.ContainsAny(v, "{}") {
		return cond{}, fmt.Errorf("path templates ({*}, {**}) are not supported")
	}
	kind, s, err := wildcard(v)
	if err != nil {
		return cond{}, err
	}
	if kind == "any" {
		return cond{perm: permAny(), httpOnly: true}, nil
	}
	return cond{perm: &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{
		Rule: &matcherv3.PathMatcher_Path{Path: stringMatch(kind, s, false)}}}}, httpOnly: true}, nil
}

func portMatcher(v string) (cond, error) {
	n, err := strconv.ParseUint(v, 10, 16)
	if err != nil || n == 0 {
		return cond{}, fmt.Errorf("not a port number (1-65535)")
	}
	return cond{perm: &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationPort{DestinationPort: uint32(n)}}}, nil
}

// headerKey matches request.headers[NAME].
var headerKey = regexp.MustCompile(`^request\.headers\[([^\[\]]+)\]$`)

// conditionMatcher returns the translation of a `when` key, nil when the key
// is not supported.
func conditionMatcher(key string) matcherFunc {
	switch key {
	case "source.principal":
		return principalMatcher
	case "source.namespace":
		return namespaceMatcher
	case "source.ip":
		return directIPMatcher
	case "remote.ip":
		return remoteIPMatcher
	case "destination.port":
		return portMatcher
	}
	if m := headerKey.FindStringSubmatch(key); m != nil {
		name := strings.ToLower(m[1])
		return func(v string) (cond, error) {
			kind, s, err := wildcard(v)
			if err != nil {
				return cond{}, err
			}
			if kind == "any" {
				return cond{perm: &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{Name: name,
					HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: true}}}}, httpOnly: true}, nil
			}
			return cond{perm: headerPerm(name, stringMatch(kind, s, false)), httpOnly: true}, nil
		}
	}
	return nil
}

// compilePeer reports the fields of pa it cannot honour. The policy is kept
// either way: leaving out a STRICT policy would lower the mode.
func (m *SecurityMesh) compilePeer(pa *securityv1.PeerAuthentication) bool {
	const kind = "PeerAuthentication"
	for _, f := range unsupportedFields(&pa.Spec, peerSpecFields) {
		m.warn(kind, pa, ReasonUnsupported, "%s: not supported", f)
	}
	if len(pa.Spec.PortLevelMtls) > 0 && len(pa.Spec.GetSelector().GetMatchLabels()) == 0 {
		m.warn(kind, pa, ReasonInvalid, "spec.portLevelMtls: needs a workload selector (as Istio); the port-level modes are not applied")
	}
	for port := range pa.Spec.PortLevelMtls {
		if port == 0 || port > 65535 {
			m.warn(kind, pa, ReasonInvalid, "spec.portLevelMtls[%d]: not a port number (1-65535); the entry is not applied", port)
		}
	}
	return true
}

// ForProxy returns the inbound security configuration of p.
func (m *SecurityMesh) ForProxy(p Proxy) *Security {
	s := &Security{}
	var deny, allow []*authzPolicy
	for _, ap := range m.policies {
		if ap.skip || !m.applies(ap.obj.Namespace, ap.obj.Spec.GetSelector().GetMatchLabels(), p) {
			continue
		}
		if ap.deny {
			deny = append(deny, ap)
		} else {
			allow = append(allow, ap)
		}
	}
	if len(deny) > 0 {
		h, t := rbacSets(deny, rbacv3.RBAC_DENY)
		s.HTTP = append(s.HTTP, &rbachttpv3.RBAC{Rules: h})
		s.TCP = append(s.TCP, &rbactcpv3.RBAC{Rules: t, StatPrefix: "tcp."})
	}
	if len(allow) > 0 {
		h, t := rbacSets(allow, rbacv3.RBAC_ALLOW)
		s.HTTP = append(s.HTTP, &rbachttpv3.RBAC{Rules: h})
		s.TCP = append(s.TCP, &rbactcpv3.RBAC{Rules: t, StatPrefix: "tcp."})
	}
	s.Mode, s.Ports = m.peerMode(p)
	return s
}

func rbacSets(aps []*authzPolicy, action rbacv3.RBAC_Action) (h, t *rbacv3.RBAC) {
	h = &rbacv3.RBAC{Action: action, Policies: map[string]*rbacv3.Policy{}}
	t = &rbacv3.RBAC{Action: action, Policies: map[string]*rbacv3.Policy{}}
	for _, ap := range aps {
		for i, n := range ap.names {
			if ap.http[i] != nil {
				h.Policies[n] = ap.http[i]
			}
			if ap.tcp[i] != nil {
				t.Policies[n] = ap.tcp[i]
			}
		}
	}
	return h, t
}

// applies reports whether a policy of namespace ns with selector sel applies
// to p: in p's namespace or the root namespace, and every label matches.
func (m *SecurityMesh) applies(ns string, sel map[string]string, p Proxy) bool {
	if ns != p.Namespace && ns != m.root {
		return false
	}
	for k, v := range sel {
		if got, ok := p.Labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

func peerMode(mt *security.PeerAuthentication_MutualTLS) MTLSMode {
	switch mt.GetMode() {
	case security.PeerAuthentication_MutualTLS_STRICT:
		return MTLSStrict
	case security.PeerAuthentication_MutualTLS_PERMISSIVE:
		return MTLSPermissive
	case security.PeerAuthentication_MutualTLS_DISABLE:
		return MTLSDisable
	}
	return "" // UNSET: inherit
}

// peerMode resolves p's mode: workload policy (oldest first), namespace
// policy, mesh policy, PERMISSIVE; UNSET inherits from the next level.
func (m *SecurityMesh) peerMode(p Proxy) (MTLSMode, map[uint32]MTLSMode) {
	var workload, namespace, mesh *securityv1.PeerAuthentication
	for _, pa := range m.peers {
		sel := pa.Spec.GetSelector().GetMatchLabels()
		switch {
		case pa.Namespace == p.Namespace && len(sel) > 0:
			if workload == nil && m.applies(pa.Namespace, sel, p) {
				workload = pa
			}
		case pa.Namespace == p.Namespace:
			if namespace == nil {
				namespace = pa
			}
		case pa.Namespace == m.root && len(sel) == 0:
			if mesh == nil {
				mesh = pa
			}
		}
	}
	mode := MTLSPermissive
	for _, pa := range []*securityv1.PeerAuthentication{mesh, namespace, workload} {
		if pa == nil {
			continue
		}
		if md := peerMode(pa.Spec.GetMtls()); md != "" {
			mode = md
		}
	}
	var ports map[uint32]MTLSMode
	if workload != nil {
		for port, mt := range workload.Spec.PortLevelMtls {
			if md := peerMode(mt); md != "" && port > 0 && port <= 65535 {
				if ports == nil {
					ports = map[uint32]MTLSMode{}
				}
				ports[port] = md
			}
		}
	}
	return mode, ports
}
