package l7

import (
	"github.com/meshlet/meshlet/proxy/l7/upstream"
	"math/rand/v2"
	"net"
	"net/http"
	"net/netip"
	"regexp"
	"strings"

	"github.com/meshlet/meshlet/proxy/config"
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

type destination struct {
	cluster *upstream.Cluster // nil: the configuration does not define it (503 NC)
	name    string            // the cluster's name
	subset  string
	weight  uint64
}

// route is a compiled Route.
type route struct {
	cfg      *config.Route
	key      string // service/route, the metric and log label
	matchers []matcher
	dests    []destination
	total    uint64
	retry    *retryPolicy // nil: no retries and no per-try timeout
	budget   *retryBudget
	mirror   *upstream.Cluster
	metrics  map[*upstream.Cluster]*routeMetrics
	// authorize decides each request (the inbound route's, from
	// config.InboundPolicy.Authorize); nil allows all.
	authorize func(*http.Request, netip.AddrPort) (bool, string)
	// inbound: the route of inbound traffic (X-Forwarded-Client-Cert is
	// set on its requests).
	inbound bool
}

func (r *route) matches(req *http.Request, host string) (*matcher, bool) {
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

// pickDest draws a weighted destination.
func (r *route) pickDest() *destination {
	if len(r.dests) == 1 || r.total == 0 {
		return &r.dests[0]
	}
	n := rand.Uint64N(r.total)
	for i := range r.dests {
		if n < r.dests[i].weight {
			return &r.dests[i]
		}
		n -= r.dests[i].weight
	}
	return &r.dests[len(r.dests)-1]
}

// service is a compiled Service.
type service struct {
	cfg      *config.Service
	exact    map[string]bool
	suffixes []string // from "*.example.com": ".example.com"
	any      bool
	addrs    []netip.Prefix
	ports    map[uint16]bool
	routes   []*route
}

func (s *service) matchesHost(host string) bool {
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

func (s *service) matchesAddr(a netip.Addr) bool {
	for _, p := range s.addrs {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func (s *service) matchesPort(p uint16) bool { return len(s.ports) == 0 || s.ports[p] }

// hostOnly strips the port from an authority and lowercases it.
func hostOnly(authority string) string {
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

// findService chooses the service for a request: first by authority among
// services on the destination port, then by the original destination
// address (VIP). nil means passthrough to the original destination.
func findService(services []*service, host string, dst netip.AddrPort) *service {
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
