package translate

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	networking "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
)

// Mesh is the compiled, read-only index of one Inputs. ForProxy may be
// called on it from several goroutines.
type Mesh struct {
	domain string
	root   string
	// trustDomain is the SPIFFE trust domain of workload identities.
	trustDomain string
	services    map[string]*service // by host (FQDN or ServiceEntry host)
	ordered     []*service          // by host
	vs          map[string]*boundVS // by host
	dr          map[string][]*networkingv1.DestinationRule
	sidecars    []*networkingv1.Sidecar
	pods        map[string]*corev1.Pod // "ns/name"
	podByIP     map[string]*corev1.Pod
	// inbound maps a pod IP to the target ports Services send to it, with
	// their protocol.
	inbound  map[string]map[uint32]string
	security *SecurityMesh
	warnings []Warning
	// labelKeys are the label keys any selector of the mesh reads (Sidecar
	// workloadSelector, VirtualService sourceLabels, AuthorizationPolicy
	// and PeerAuthentication selectors): a proxy's other labels do not
	// change its resources, so Key leaves them out.
	labelKeys map[string]bool
}

type service struct {
	host      string
	name      string // Kubernetes name, or the host for a ServiceEntry
	namespace string
	kube      bool
	addresses []string
	ports     []svcPort
	dns       bool // STRICT_DNS (ServiceEntry resolution DNS)
	// endpoints by service port number.
	endpoints map[uint32][]endpoint
}

type svcPort struct {
	number   uint32
	name     string
	protocol string // http, http2, grpc, tcp, "" (unknown: detected)
	target   uint32 // ServiceEntry targetPort / Service numeric targetPort
}

type endpoint struct {
	address string // IP, or a DNS name for DNS resolution
	port    uint32
	health  corev3.HealthStatus
	labels  map[string]string
	pod     string
	// namespace and sa are the pod's namespace and service account (its
	// identity); sa is empty for endpoints that are no pod.
	namespace, sa string
}

type boundVS struct {
	vs *networkingv1.VirtualService
}

// Warnings returns the resources Compile refused, sorted.
func (m *Mesh) Warnings() []Warning { return m.warnings }

func (m *Mesh) warn(obj metav1.Object, kind, reason, format string, a ...any) {
	m.warnings = append(m.warnings, Warning{Kind: kind, Namespace: obj.GetNamespace(), Name: obj.GetName(), UID: string(obj.GetUID()),
		Reason: reason, Message: fmt.Sprintf(format, a...)})
}

func (m *Mesh) refuseUnsupported(obj metav1.Object, kind string, fields []string) bool {
	for _, f := range fields {
		m.warn(obj, kind, ReasonUnsupported, "%s: not supported", f)
	}
	return len(fields) > 0
}

// Compile indexes in. Resources it cannot translate are left out and
// reported by Warnings; everything else is served.
func Compile(in *Inputs) *Mesh {
	m := &Mesh{domain: cmp.Or(in.Domain, DefaultDomain), root: cmp.Or(in.RootNamespace, DefaultRootNamespace),
		trustDomain: cmp.Or(in.TrustDomain, DefaultTrustDomain),
		services:    map[string]*service{}, vs: map[string]*boundVS{}, dr: map[string][]*networkingv1.DestinationRule{},
		pods: map[string]*corev1.Pod{}, podByIP: map[string]*corev1.Pod{}}
	for _, p := range in.Pods {
		m.pods[p.Namespace+"/"+p.Name] = p
		for _, ip := range p.Status.PodIPs {
			m.podByIP[ip.IP] = p
		}
	}
	m.addKubeServices(in)
	for _, se := range sortedObjs(in.ServiceEntries) {
		m.addServiceEntry(se)
	}
	m.inbound = map[string]map[uint32]string{}
	for _, s := range m.services {
		m.ordered = append(m.ordered, s)
		if !s.kube {
			continue
		}
		for _, sp := range s.ports {
			for _, ep := range s.endpoints[sp.number] {
				ports := m.inbound[ep.address]
				if ports == nil {
					ports = map[uint32]string{}
					m.inbound[ep.address] = ports
				}
				if old, ok := ports[ep.port]; !ok || old == "" || sp.protocol != "" && sp.protocol < old {
					ports[ep.port] = sp.protocol
				}
			}
		}
	}
	slices.SortFunc(m.ordered, func(a, b *service) int { return strings.Compare(a.host, b.host) })
	for _, vs := range sortedObjs(in.VirtualServices) {
		m.addVirtualService(vs)
	}
	for _, dr := range sortedObjs(in.DestinationRules) {
		m.addDestinationRule(dr)
	}
	for _, sc := range sortedObjs(in.Sidecars) {
		if m.refuseUnsupported(sc, "Sidecar", unsupportedFields(&sc.Spec, sidecarFields)) {
			continue
		}
		m.sidecars = append(m.sidecars, sc)
	}
	sec := in.Security
	sec.RootNamespace = m.root
	m.security = CompileSecurity(&sec)
	m.warnings = append(m.warnings, m.security.Warnings()...)
	m.labelKeys = m.selectorKeys()
	slices.SortFunc(m.warnings, func(a, b Warning) int { return strings.Compare(a.String(), b.String()) })
	return m
}

// sortedObjs orders objects oldest first (Istio's conflict rule), then by
// namespace and name.
func sortedObjs[T metav1.Object](objs []T) []T {
	out := slices.Clone(objs)
	slices.SortStableFunc(out, func(a, b T) int {
		ta, tb := a.GetCreationTimestamp(), b.GetCreationTimestamp()
		if c := ta.Time.Compare(tb.Time); c != 0 {
			return c
		}
		return cmp.Or(strings.Compare(a.GetNamespace(), b.GetNamespace()), strings.Compare(a.GetName(), b.GetName()))
	})
	return out
}

func (m *Mesh) kubeHost(name, ns string) string { return name + "." + ns + ".svc." + m.domain }

// resolveHost expands a host written in namespace ns the way Istio does:
// a short name is a Service of that namespace.
func (m *Mesh) resolveHost(h, ns string) string {
	switch {
	case h == "*" || strings.HasPrefix(h, "*."):
		return h
	case !strings.Contains(h, "."):
		return m.kubeHost(h, ns)
	case m.services[h] != nil:
		return h
	case strings.Count(h, ".") == 1 && m.services[m.kubeHost(strings.Split(h, ".")[0], strings.Split(h, ".")[1])] != nil:
		p := strings.Split(h, ".")
		return m.kubeHost(p[0], p[1])
	case strings.HasSuffix(h, ".svc"):
		return h + "." + m.domain
	}
	return h
}

// Protocols (docs/xds.md).
const (
	protoHTTP  = "http"
	protoHTTP2 = "http2"
	protoGRPC  = "grpc"
	protoTCP   = "tcp"
)

// portProtocol resolves a port's protocol the way Istio does: appProtocol,
// then the name's prefix; "" when unknown (detected by the proxy).
func portProtocol(appProtocol, name string) string {
	norm := func(s string) (string, bool) {
		switch strings.ToLower(s) {
		case "http", "http1", "kubernetes.io/http":
			return protoHTTP, true
		case "http2", "h2c", "kubernetes.io/h2c":
			return protoHTTP2, true
		case "grpc", "grpc-web":
			return protoGRPC, true
		case "tcp", "tls", "https", "mongo", "mysql", "redis", "kubernetes.io/wss":
			return protoTCP, true
		case "kubernetes.io/ws":
			return protoHTTP, true
		}
		return "", false
	}
	if appProtocol != "" {
		if p, ok := norm(appProtocol); ok {
			return p
		}
		return protoTCP
	}
	prefix, _, _ := strings.Cut(name, "-")
	p, _ := norm(prefix)
	return p
}

func (m *Mesh) addKubeServices(in *Inputs) {
	slices := map[string][]*discoveryv1.EndpointSlice{}
	for _, es := range in.EndpointSlices {
		svc := es.Labels[discoveryv1.LabelServiceName]
		if svc == "" || es.AddressType == discoveryv1.AddressTypeFQDN {
			continue
		}
		slices[es.Namespace+"/"+svc] = append(slices[es.Namespace+"/"+svc], es)
	}
	for _, k := range in.Services {
		if k.Spec.Type == corev1.ServiceTypeExternalName {
			continue
		}
		s := &service{host: m.kubeHost(k.Name, k.Namespace), name: k.Name, namespace: k.Namespace, kube: true,
			endpoints: map[uint32][]endpoint{}}
		for _, ip := range k.Spec.ClusterIPs {
			if ip != "" && ip != corev1.ClusterIPNone {
				s.addresses = append(s.addresses, ip)
			}
		}
		for _, p := range k.Spec.Ports {
			if p.Protocol != "" && p.Protocol != corev1.ProtocolTCP {
				continue
			}
			sp := svcPort{number: uint32(p.Port), name: p.Name, protocol: portProtocol(ptrStr(p.AppProtocol), p.Name)}
			s.ports = append(s.ports, sp)
			s.endpoints[sp.number] = m.kubeEndpoints(slices[k.Namespace+"/"+k.Name], p)
		}
		m.services[s.host] = s
	}
}

func ptrStr(p *string) string {
	if p == nil {
		return ""
	}
	return *p
}

// kubeEndpoints lists the endpoints of one Service port from its slices:
// ready → HEALTHY, serving and terminating → DRAINING, otherwise UNHEALTHY.
// An address in several slices is listed once.
func (m *Mesh) kubeEndpoints(ess []*discoveryv1.EndpointSlice, sp corev1.ServicePort) []endpoint {
	var out []endpoint
	seen := map[string]bool{}
	for _, es := range ess {
		var port int32
		found := false
		for _, p := range es.Ports {
			if ptrStr(p.Name) == sp.Name && (p.Protocol == nil || *p.Protocol == corev1.ProtocolTCP) && p.Port != nil {
				port, found = *p.Port, true
				break
			}
		}
		if !found {
			continue
		}
		for _, e := range es.Endpoints {
			health := corev3.HealthStatus_HEALTHY
			c := e.Conditions
			switch {
			case c.Ready == nil || *c.Ready:
			case c.Serving != nil && *c.Serving && c.Terminating != nil && *c.Terminating:
				health = corev3.HealthStatus_DRAINING
			default:
				health = corev3.HealthStatus_UNHEALTHY
			}
			var lbls map[string]string
			pod, podNS, podSA := "", "", ""
			if r := e.TargetRef; r != nil && r.Kind == "Pod" {
				pod = r.Name
				if p := m.pods[cmp.Or(r.Namespace, es.Namespace)+"/"+r.Name]; p != nil {
					lbls = p.Labels
					podNS, podSA = p.Namespace, cmp.Or(p.Spec.ServiceAccountName, "default")
				}
			}
			for _, a := range e.Addresses {
				key := fmt.Sprintf("%s:%d", a, port)
				if seen[key] {
					continue
				}
				seen[key] = true
				ep := endpoint{address: a, port: uint32(port), health: health, labels: lbls, pod: pod, namespace: podNS, sa: podSA}
				if ep.labels == nil {
					if p := m.podByIP[a]; p != nil {
						ep.labels, ep.pod = p.Labels, p.Name
						ep.namespace, ep.sa = p.Namespace, cmp.Or(p.Spec.ServiceAccountName, "default")
					}
				}
				out = append(out, ep)
			}
		}
	}
	slices.SortFunc(out, func(a, b endpoint) int {
		return cmp.Or(strings.Compare(a.address, b.address), cmp.Compare(a.port, b.port))
	})
	return out
}

func (m *Mesh) addServiceEntry(se *networkingv1.ServiceEntry) {
	const kind = "ServiceEntry"
	spec := &se.Spec
	if m.refuseUnsupported(se, kind, unsupportedFields(spec, serviceEntryFields)) {
		return
	}
	bad := false
	invalid := func(format string, a ...any) { m.warn(se, kind, ReasonInvalid, format, a...); bad = true }
	switch spec.Resolution {
	case networking.ServiceEntry_STATIC, networking.ServiceEntry_DNS:
	default:
		m.warn(se, kind, ReasonUnsupported, "spec.resolution: %s not supported (STATIC or DNS)", spec.Resolution)
		return
	}
	if len(spec.Ports) == 0 {
		invalid("spec.ports: at least one port is needed")
	}
	for i, h := range spec.Hosts {
		if strings.Contains(h, "*") {
			m.warn(se, kind, ReasonUnsupported, "spec.hosts[%d]: wildcard host %q not supported", i, h)
			return
		}
	}
	for i, a := range spec.Addresses {
		if _, err := netip.ParseAddr(a); err != nil {
			invalid("spec.addresses[%d]: %q is not an IP address", i, a)
		}
	}
	if spec.Resolution == networking.ServiceEntry_STATIC && len(spec.Endpoints) == 0 {
		invalid("spec.endpoints: resolution STATIC needs endpoints")
	}
	if spec.Resolution == networking.ServiceEntry_DNS && len(spec.Endpoints) > 1 {
		m.warn(se, kind, ReasonUnsupported, "spec.endpoints: resolution DNS with more than one endpoint not supported")
		return
	}
	for i, e := range spec.Endpoints {
		if spec.Resolution == networking.ServiceEntry_STATIC {
			if _, err := netip.ParseAddr(e.Address); err != nil {
				invalid("spec.endpoints[%d].address: %q is not an IP address (resolution STATIC)", i, e.Address)
			}
		}
	}
	if bad {
		return
	}
	for hi, h := range spec.Hosts {
		if old := m.services[h]; old != nil {
			m.warn(se, kind, ReasonInvalid, "spec.hosts[%d]: %q is already defined by %s/%s", hi, h, old.namespace, old.name)
			continue
		}
		s := &service{host: h, name: h, namespace: se.Namespace, addresses: spec.Addresses,
			dns: spec.Resolution == networking.ServiceEntry_DNS, endpoints: map[uint32][]endpoint{}}
		for _, p := range spec.Ports {
			sp := svcPort{number: p.Number, name: p.Name, protocol: portProtocol(p.Protocol, ""), target: p.TargetPort}
			s.ports = append(s.ports, sp)
			var eps []endpoint
			for _, e := range spec.Endpoints {
				port := cmp.Or(e.Ports[p.Name], p.TargetPort, p.Number)
				eps = append(eps, endpoint{address: e.Address, port: port, health: corev3.HealthStatus_HEALTHY, labels: e.Labels})
			}
			if len(spec.Endpoints) == 0 { // DNS: the host itself
				eps = []endpoint{{address: h, port: cmp.Or(p.TargetPort, p.Number), health: corev3.HealthStatus_HEALTHY}}
			}
			s.endpoints[sp.number] = eps
		}
		m.services[h] = s
	}
}

func (m *Mesh) addVirtualService(vs *networkingv1.VirtualService) {
	const kind = "VirtualService"
	spec := &vs.Spec
	if m.refuseUnsupported(vs, kind, unsupportedFields(spec, virtualServiceFields)) {
		return
	}
	if len(spec.Gateways) > 0 && !slices.Contains(spec.Gateways, "mesh") {
		return // not for sidecars
	}
	if errs := validateVS(spec); len(errs) > 0 {
		for _, e := range errs {
			m.warn(vs, kind, ReasonInvalid, "%s", e)
		}
		return
	}
	for i, h := range spec.Hosts {
		host := m.resolveHost(h, vs.Namespace)
		var targets []string
		if strings.HasPrefix(host, "*") {
			for _, s := range m.ordered {
				if host == "*" || strings.HasSuffix(s.host, host[1:]) {
					targets = append(targets, s.host)
				}
			}
		} else if m.services[host] != nil {
			targets = []string{host}
		}
		if len(targets) == 0 {
			m.warn(vs, kind, ReasonInvalid, "spec.hosts[%d]: %q matches no Service or ServiceEntry; nothing is served for it", i, h)
			continue
		}
		for _, t := range targets {
			if old := m.vs[t]; old != nil {
				m.warn(vs, kind, ReasonInvalid, "spec.hosts[%d]: host %s is already routed by VirtualService %s/%s (the oldest wins)", i, t, old.vs.Namespace, old.vs.Name)
				continue
			}
			m.vs[t] = &boundVS{vs: vs}
		}
	}
}

func (m *Mesh) addDestinationRule(dr *networkingv1.DestinationRule) {
	const kind = "DestinationRule"
	spec := &dr.Spec
	if m.refuseUnsupported(dr, kind, unsupportedFields(spec, destinationRuleFields)) {
		return
	}
	if errs := validateDR(spec); len(errs) > 0 {
		for _, e := range errs {
			m.warn(dr, kind, e.reason, "%s", e.msg)
		}
		return
	}
	host := m.resolveHost(spec.Host, dr.Namespace)
	for _, old := range m.dr[host] {
		if old.Namespace == dr.Namespace {
			m.warn(dr, kind, ReasonInvalid, "spec.host: %s already has DestinationRule %s/%s in this namespace (the oldest wins)", host, old.Namespace, old.Name)
			return
		}
	}
	m.dr[host] = append(m.dr[host], dr)
}

// destinationRule picks the rule of host for a proxy in namespace ns:
// the proxy's namespace first, then the service's, then the root namespace.
func (m *Mesh) destinationRule(host, ns string) *networkingv1.DestinationRule {
	rules := m.dr[host]
	svcNS := ""
	if s := m.services[host]; s != nil {
		svcNS = s.namespace
	}
	for _, want := range []string{ns, svcNS, m.root} {
		for _, r := range rules {
			if want != "" && r.Namespace == want {
				return r
			}
		}
	}
	return nil
}

// sidecarFor returns the Sidecar scoping proxy p: a selector match in its
// namespace, else its namespace's selector-less one, else the root
// namespace's selector-less one.
func (m *Mesh) sidecarFor(p *Proxy) *networkingv1.Sidecar {
	var nsDefault, rootDefault *networkingv1.Sidecar
	for _, sc := range m.sidecars {
		sel := sc.Spec.WorkloadSelector
		switch {
		case sc.Namespace == p.Namespace && sel != nil && len(sel.Labels) > 0:
			if labels.SelectorFromSet(sel.Labels).Matches(labels.Set(p.Labels)) {
				return sc
			}
		case sc.Namespace == p.Namespace && nsDefault == nil:
			nsDefault = sc
		case sc.Namespace == m.root && (sel == nil || len(sel.Labels) == 0) && rootDefault == nil:
			rootDefault = sc
		}
	}
	return cmp.Or(nsDefault, rootDefault)
}

// visible reports whether s is in the egress scope of sidecar sc for a
// proxy in namespace ns.
func visible(sc *networkingv1.Sidecar, s *service, ns string) bool {
	if sc == nil {
		return true
	}
	for _, eg := range sc.Spec.Egress {
		for _, h := range eg.Hosts {
			hns, host, ok := strings.Cut(h, "/")
			if !ok {
				continue
			}
			switch hns {
			case "*":
			case ".":
				if s.namespace != ns {
					continue
				}
			case "~":
				continue
			default:
				if s.namespace != hns {
					continue
				}
			}
			if host == "*" || host == s.host || strings.HasPrefix(host, "*.") && strings.HasSuffix(s.host, host[1:]) ||
				s.kube && host == s.name {
				return true
			}
		}
	}
	return false
}

// selectorKeys collects labelKeys. Every selector ForProxy evaluates
// against a proxy's labels must be listed here (TestKeyIgnoresUnselectedLabels
// checks the golden cases' output does not change with other labels).
func (m *Mesh) selectorKeys() map[string]bool {
	keys := map[string]bool{}
	add := func(sel map[string]string) {
		for k := range sel {
			keys[k] = true
		}
	}
	for _, sc := range m.sidecars {
		add(sc.Spec.GetWorkloadSelector().GetLabels())
	}
	for _, b := range m.vs {
		for _, h := range b.vs.Spec.GetHttp() {
			for _, mt := range h.GetMatch() {
				add(mt.GetSourceLabels())
			}
		}
	}
	for _, ap := range m.security.policies {
		add(ap.obj.Spec.GetSelector().GetMatchLabels())
	}
	for _, pa := range m.security.peers {
		add(pa.Spec.GetSelector().GetMatchLabels())
	}
	return keys
}
