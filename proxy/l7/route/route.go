// Package route is the L7 engine's routing: services (hosts, addresses,
// ports) and their compiled routes — request matchers, weighted
// destinations, the retry policy and budget, mirroring, rewrites and
// header operations. A compiled Route never changes; what a route needs at
// request time (its retry budget, its metrics) lives on it, so a table of
// them is replaced as a whole.
package route

import (
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"strings"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
)

// strMatcher is a compiled StringMatch.
type strMatcher struct {
	exact, prefix string
	re            *regexp.Regexp
	present       bool
}

func compileStr(m config.StringMatch) strMatcher {
	s := strMatcher{exact: m.Exact, prefix: m.Prefix, present: m.Present}
	if m.Regex != "" {
		s.re = regexp.MustCompile("^(?:" + m.Regex + ")$") // validated; full match like Envoy
	}
	return s
}

func (s *strMatcher) match(v string) bool {
	switch {
	case s.exact != "":
		return v == s.exact
	case s.prefix != "":
		return strings.HasPrefix(v, s.prefix)
	case s.re != nil:
		return s.re.MatchString(v)
	}
	return false
}

type headerMatcher struct {
	name string // canonical
	m    strMatcher
}

type matcher struct {
	uri       *strMatcher
	authority *strMatcher
	method    string
	headers   []headerMatcher
}

func (m *matcher) match(r *http.Request, host string) bool {
	if m.method != "" && r.Method != m.method {
		return false
	}
	if m.uri != nil && !m.uri.match(r.URL.Path) {
		return false
	}
	if m.authority != nil && !m.authority.match(host) {
		return false
	}
	for i := range m.headers {
		h := &m.headers[i]
		vs, ok := r.Header[h.name]
		if h.m.present {
			if !ok {
				return false
			}
			continue
		}
		if !ok || !h.m.match(strings.Join(vs, ",")) {
			return false
		}
	}
	return true
}

// Destination is one weighted destination of a route.
type Destination struct {
	// Cluster is nil when the configuration does not define it (answered
	// 503 NC).
	Cluster *upstream.Cluster
	Name    string // the cluster's name
	Subset  string // "": all its endpoints
	weight  uint64
}

// Route is a compiled config.Route. Its fields are set by Compile (or
// Local) and never change afterwards.
type Route struct {
	// Config is the route's configuration.
	Config *config.Route
	// Key is "service/route", the route's metric and log label.
	Key      string
	matchers []matcher
	// Dests are the weighted destinations (at least one).
	Dests []Destination
	total uint64
	// Retry is nil without retries and per-try timeout.
	Retry *RetryPolicy
	// Budget limits the route's retries (nil: unlimited).
	Budget *Budget
	// Mirror is the cluster requests are mirrored to (nil: none).
	Mirror *upstream.Cluster
	// Metrics are the route's series per destination cluster.
	Metrics map[*upstream.Cluster]*Metrics
	// Authorize decides each request (the inbound route's, from
	// config.InboundPolicy.Authorize); nil allows all.
	Authorize func(*http.Request, netip.AddrPort) (bool, string)
	// Inbound marks the route of inbound traffic (its requests get
	// X-Forwarded-Client-Cert); the engine sets it when it builds the route.
	Inbound bool
}

// Local builds a route whose one destination is c (the engine's inbound
// and passthrough routes, keyed by cfg.Name), counted in m.
func Local(cfg *config.Route, c *upstream.Cluster, m *Metrics, authorize func(*http.Request, netip.AddrPort) (bool, string)) *Route {
	return &Route{Config: cfg, Key: cfg.Name, Dests: []Destination{{Cluster: c, Name: c.Name()}},
		Metrics: map[*upstream.Cluster]*Metrics{c: m}, Authorize: authorize}
}

// Compile builds route r of the service named svc. clusters are the
// clusters of its table (a destination not among them is answered 503
// NC); metrics resolves the route's series for one of them, once.
func Compile(svc string, r *config.Route, clusters map[string]*upstream.Cluster, metrics func(key string, c *upstream.Cluster) *Metrics) *Route {
	cr := &Route{Config: r, Key: svc + "/" + r.Name, Metrics: map[*upstream.Cluster]*Metrics{}}
	for _, m := range r.Match {
		var cm matcher
		cm.method = m.Method
		if m.URI != nil {
			sm := compileStr(*m.URI)
			cm.uri = &sm
		}
		if m.Authority != nil {
			sm := compileStr(*m.Authority)
			cm.authority = &sm
		}
		for name, hm := range m.Headers {
			cm.headers = append(cm.headers, headerMatcher{name: http.CanonicalHeaderKey(name), m: compileStr(hm)})
		}
		cr.matchers = append(cr.matchers, cm)
	}
	for _, d := range r.Destinations {
		cl := clusters[d.Cluster] // nil: not (yet) defined, answered 503 NC
		w := uint64(d.Weight)
		if len(r.Destinations) == 1 && w == 0 {
			w = 1
		}
		cr.Dests = append(cr.Dests, Destination{Cluster: cl, Name: d.Cluster, Subset: d.Subset, weight: w})
		cr.total += w
		if cl != nil && cr.Metrics[cl] == nil {
			cr.Metrics[cl] = metrics(cr.Key, cl)
		}
	}
	if r.Retries != nil {
		cr.Retry = CompileRetry(r.Retries)
		cr.Budget = NewBudget(r.Retries.Budget)
	}
	if r.Mirror != nil {
		cr.Mirror = clusters[r.Mirror.Cluster]
	}
	return cr
}

// Matches reports whether req (to host: lowercased, without port)
// matches r; a route without match conditions matches every request.
func (r *Route) Matches(req *http.Request, host string) bool {
	_, ok := r.matches(req, host)
	return ok
}

func (r *Route) matches(req *http.Request, host string) (*matcher, bool) {
	if len(r.matchers) == 0 {
		return nil, true
	}
	for i := range r.matchers {
		if r.matchers[i].match(req, host) {
			return &r.matchers[i], true
		}
	}
	return nil, false
}

// PickDest draws a weighted destination.
func (r *Route) PickDest() *Destination {
	if len(r.Dests) == 1 || r.total == 0 {
		return &r.Dests[0]
	}
	n := rand.Uint64N(r.total)
	for i := range r.Dests {
		if n < r.Dests[i].weight {
			return &r.Dests[i]
		}
		n -= r.Dests[i].weight
	}
	return &r.Dests[len(r.Dests)-1]
}

// Rewrite applies the route's rewrite (path, authority) to req, a request
// to host that r matched.
func (r *Route) Rewrite(req *http.Request, host string) {
	rw := r.Config.Rewrite
	if rw == nil {
		return
	}
	if rw.URI != "" {
		path := req.URL.Path
		replaced := false
		if m, _ := r.matches(req, host); m != nil && m.uri != nil && m.uri.prefix != "" {
			path = rw.URI + strings.TrimPrefix(path, m.uri.prefix)
			if strings.HasPrefix(path, "//") {
				path = path[1:]
			}
			replaced = true
		}
		if !replaced {
			path = rw.URI
		}
		req.URL.Path = path
		req.URL.RawPath = ""
	}
	if rw.Authority != "" {
		req.Host = rw.Authority
	}
}

// ApplyHeaderOps removes, sets and adds the headers ops names, in that
// order.
func ApplyHeaderOps(h http.Header, ops *config.HeaderOps) {
	for _, k := range ops.Remove {
		h.Del(k)
	}
	for k, v := range ops.Set {
		h.Set(k, v)
	}
	for k, v := range ops.Add {
		h.Add(k, v)
	}
}

// Service is a compiled config.Service: the hosts, addresses and ports it
// claims, and its routes in order.
type Service struct {
	// Config is the service's configuration.
	Config   *config.Service
	exact    map[string]bool
	suffixes []string // from "*.example.com": ".example.com"
	any      bool
	addrs    []netip.Prefix
	// Ports the service claims (empty: every port).
	Ports map[uint16]bool
	// Routes are tried in order; the first that matches serves.
	Routes []*Route
}

// NewService compiles the hosts, addresses and ports of s (validated),
// with its compiled routes.
func NewService(s *config.Service, routes []*Route) *Service {
	cs := &Service{Config: s, exact: map[string]bool{}, Ports: map[uint16]bool{}, Routes: routes}
	for _, h := range s.Hosts {
		h = strings.ToLower(h)
		switch {
		case h == "*":
			cs.any = true
		case strings.HasPrefix(h, "*."):
			cs.suffixes = append(cs.suffixes, h[1:])
		default:
			cs.exact[h] = true
		}
	}
	for _, a := range s.Addresses {
		if ip, err := netip.ParseAddr(a); err == nil {
			cs.addrs = append(cs.addrs, netip.PrefixFrom(ip.Unmap(), ip.Unmap().BitLen()))
		} else {
			cs.addrs = append(cs.addrs, netip.MustParsePrefix(a).Masked())
		}
	}
	for _, pc := range s.Ports {
		cs.Ports[pc.Port] = true
	}
	return cs
}

func (s *Service) matchesHost(host string) bool {
	if s.any || s.exact[host] {
		return true
	}
	for _, suf := range s.suffixes {
		if strings.HasSuffix(host, suf) {
			return true
		}
	}
	return false
}

func (s *Service) matchesAddr(a netip.Addr) bool {
	for _, p := range s.addrs {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func (s *Service) matchesPort(p uint16) bool { return len(s.Ports) == 0 || s.Ports[p] }

// HostOnly strips the port from an authority and lowercases it.
func HostOnly(authority string) string {
	h := authority
	if i := strings.LastIndexByte(h, ':'); i >= 0 && !strings.HasSuffix(h, "]") {
		if hh, _, err := net.SplitHostPort(h); err == nil {
			h = hh
		}
	} else if strings.HasPrefix(h, "[") && strings.HasSuffix(h, "]") {
		h = h[1 : len(h)-1]
	}
	for i := 0; i < len(h); i++ {
		if c := h[i]; c >= 'A' && c <= 'Z' {
			return strings.ToLower(h)
		}
	}
	return h
}

// Find chooses the service for a request: first by authority among
// services on the destination port, then by the original destination
// address (VIP). nil means passthrough to the original destination.
func Find(services []*Service, host string, dst netip.AddrPort) *Service {
	for _, s := range services {
		if s.matchesPort(dst.Port()) && s.matchesHost(host) {
			return s
		}
	}
	a := dst.Addr().Unmap()
	for _, s := range services {
		if s.matchesPort(dst.Port()) && s.matchesAddr(a) {
			return s
		}
	}
	return nil
}
