package config

import (
	"bytes"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/netip"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"sigs.k8s.io/yaml"
)

// L7 is the L7 part of the proxy configuration (YAML; unknown fields are
// errors). The proxy's config file embeds it under `l7:`. Its shape borrows
// Istio's VirtualService (services, routes) and DestinationRule (clusters,
// subsets, traffic policy) ideas in meshlet's own schema.
type L7 struct {
	// Ports declares the protocol of destination ports (Kubernetes
	// appProtocol, Istio port-name prefixes, or an explicit protocol).
	// Ports not declared here (or by a service) are detected from their first bytes.
	Ports []PortConfig `json:"ports,omitempty"`
	// Detection tunes protocol detection.
	Detection Detection `json:"detection,omitempty"`
	// Services map host names / VIPs and ports to routes (outbound traffic).
	Services []Service `json:"services,omitempty"`
	// Clusters are groups of upstream endpoints with their traffic policy.
	Clusters []Cluster `json:"clusters,omitempty"`
	// Inbound is the policy for traffic into the local application (the
	// original destination on 15006), which is always forwarded as is.
	Inbound InboundPolicy `json:"inbound,omitempty"`
	// Passthrough is the policy for outbound HTTP to destinations that no
	// service matches (forwarded to the original destination).
	Passthrough InboundPolicy `json:"passthrough,omitempty"`
	// AccessLog configures the structured access log.
	AccessLog AccessLog `json:"accessLog,omitempty"`
	// Limits bound what a downstream client may send.
	Limits Limits `json:"limits,omitempty"`
	// HTTP2Forwarder selects how h2c downstream connections are served:
	// "frames" (default: the frame-level forwarder, on ports whose routes it
	// supports; see README) or "nethttp" (net/http's server and transport
	// for all of them).
	HTTP2Forwarder string `json:"http2Forwarder,omitempty"`
}

// PortConfig declares one port's protocol.
type PortConfig struct {
	Port uint16 `json:"port"`
	// Name is a Kubernetes port name; prefixes http-, http2-, grpc-,
	// grpc-web-, tcp- (and the bare names) select the protocol as in Istio.
	Name string `json:"name,omitempty"`
	// AppProtocol is Kubernetes' appProtocol (wins over Name).
	AppProtocol string `json:"appProtocol,omitempty"`
	// Protocol is explicit: http, http2, grpc, tcp or auto (wins over both).
	Protocol string `json:"protocol,omitempty"`
}

// Detection tunes first-bytes protocol detection on undeclared ports.
type Detection struct {
	// Timeout is how long the proxy waits for a client's first bytes before
	// treating the connection as opaque TCP (Istio's
	// protocolDetectionTimeout), within 1ms..1m, default 5s. A server-first
	// protocol (MySQL, SMTP, …) on an undeclared port waits this long for
	// its greeting; a short timeout misclassifies slow HTTP clients as TCP
	// (no routing, no metrics). Declaring such ports tcp avoids both.
	Timeout Duration `json:"timeout,omitempty"`
}

// Service is a set of host names (and optional VIPs) on some ports, with
// ordered routes; the first matching route wins.
type Service struct {
	Name string `json:"name"`
	// Hosts are matched against the request authority (port stripped).
	// "*.example.com" matches any subdomain; "*" matches all.
	Hosts []string `json:"hosts"`
	// Addresses are VIPs (e.g. the ClusterIP) matched against the original
	// destination IP when no host matches.
	Addresses []string `json:"addresses,omitempty"`
	// Ports the service listens on; empty means any port.
	Ports  []PortConfig `json:"ports,omitempty"`
	Routes []Route      `json:"routes"`
}

// Route matches requests and sends them to weighted destinations.
type Route struct {
	Name string `json:"name"`
	// Match: any of these (empty matches every request).
	Match []Match `json:"match,omitempty"`
	// Destinations with weights (percent-like; they are normalized).
	Destinations []Destination `json:"destinations"`
	Rewrite      *Rewrite      `json:"rewrite,omitempty"`
	// Timeout for the whole request including retries (0: none). A shorter
	// grpc-timeout from the client wins.
	Timeout Duration      `json:"timeout,omitempty"`
	Retries *RetryPolicy  `json:"retries,omitempty"`
	Fault   *Fault        `json:"fault,omitempty"`
	Mirror  *Mirror       `json:"mirror,omitempty"`
	Headers *HeaderPolicy `json:"headers,omitempty"`
}

// Match is a conjunction of conditions.
type Match struct {
	URI       *StringMatch           `json:"uri,omitempty"`
	Method    string                 `json:"method,omitempty"`
	Authority *StringMatch           `json:"authority,omitempty"`
	Headers   map[string]StringMatch `json:"headers,omitempty"`
}

// StringMatch is exactly one of exact, prefix, regex (RE2, full match), or
// present (header only).
type StringMatch struct {
	Exact   string `json:"exact,omitempty"`
	Prefix  string `json:"prefix,omitempty"`
	Regex   string `json:"regex,omitempty"`
	Present bool   `json:"present,omitempty"`
}

// Destination is a cluster (optionally a subset of it) with a weight.
type Destination struct {
	Cluster string `json:"cluster"`
	Subset  string `json:"subset,omitempty"`
	Weight  uint32 `json:"weight,omitempty"`
}

// Rewrite changes the request before it is forwarded.
type Rewrite struct {
	// URI replaces the matched prefix (for prefix matches) or the whole path.
	URI string `json:"uri,omitempty"`
	// Authority replaces the Host header.
	Authority string `json:"authority,omitempty"`
}

// RetryPolicy retries failed attempts.
type RetryPolicy struct {
	// Attempts is the number of retries (not counting the first try).
	Attempts int `json:"attempts"`
	// PerTryTimeout bounds each attempt's time to response headers (0: none).
	PerTryTimeout Duration `json:"perTryTimeout,omitempty"`
	// RetryOn lists conditions (Envoy/Istio names): 5xx, gateway-error,
	// connect-failure, reset, refused-stream, retriable-status-codes,
	// cancelled, deadline-exceeded, internal, resource-exhausted, unavailable.
	// Default: connect-failure, refused-stream, unavailable, cancelled, 503.
	RetryOn []string `json:"retryOn,omitempty"`
	// RetriableStatusCodes are the codes for retriable-status-codes.
	RetriableStatusCodes []int `json:"retriableStatusCodes,omitempty"`
	// Backoff between attempts: exponential with full jitter.
	BaseInterval Duration `json:"baseInterval,omitempty"` // default 25ms
	MaxInterval  Duration `json:"maxInterval,omitempty"`  // default 10×base
	// MaxBodyBytes bounds the request body buffered for replay (default
	// 64KiB). A request whose body exceeds it is not retried after its body
	// has started to flow.
	MaxBodyBytes int64 `json:"maxBodyBytes,omitempty"`
	// Budget limits retries to a fraction of requests (linkerd2's budget).
	Budget *RetryBudget `json:"budget,omitempty"`
}

// RetryBudget allows retries up to Ratio × requests in the last TTL, plus
// MinPerSecond.
type RetryBudget struct {
	Ratio        float64  `json:"ratio"`
	MinPerSecond float64  `json:"minPerSecond,omitempty"`
	TTL          Duration `json:"ttl,omitempty"` // default 10s
}

// Fault injects delays and aborts into a percentage of requests.
type Fault struct {
	Delay *FaultDelay `json:"delay,omitempty"`
	Abort *FaultAbort `json:"abort,omitempty"`
}

// FaultDelay delays a percentage of requests by a fixed time.
type FaultDelay struct {
	Fixed   Duration `json:"fixed"`
	Percent float64  `json:"percent"`
}

// FaultAbort answers a percentage of requests with an HTTP status or (for
// gRPC requests) a gRPC status code.
type FaultAbort struct {
	HTTPStatus int     `json:"httpStatus,omitempty"`
	GRPCStatus *int    `json:"grpcStatus,omitempty"`
	Percent    float64 `json:"percent"`
}

// Mirror sends a copy of a percentage of requests (body up to the retry
// replay bound) to another cluster, fire and forget. The copy's authority
// gets a "-shadow" suffix as in Envoy.
type Mirror struct {
	Cluster string  `json:"cluster"`
	Subset  string  `json:"subset,omitempty"`
	Percent float64 `json:"percent,omitempty"` // default 100
}

// HeaderPolicy edits request and response headers.
type HeaderPolicy struct {
	Request  HeaderOps `json:"request,omitempty"`
	Response HeaderOps `json:"response,omitempty"`
}

// HeaderOps sets, adds and removes headers.
type HeaderOps struct {
	Set    map[string]string `json:"set,omitempty"`
	Add    map[string]string `json:"add,omitempty"`
	Remove []string          `json:"remove,omitempty"`
}

// Cluster is a group of upstream endpoints.
type Cluster struct {
	Name string `json:"name"`
	// Protocol to the upstream: http1, http2 (h2c prior knowledge) or auto
	// (default: the downstream request's protocol; gRPC always uses http2).
	Protocol  string     `json:"protocol,omitempty"`
	Endpoints []Endpoint `json:"endpoints,omitempty"`
	// DNS resolves a name (e.g. a Kubernetes Service's FQDN or headless
	// service) with the system resolver and refreshes it.
	DNS          *DNSDiscovery     `json:"dns,omitempty"`
	Subsets      []Subset          `json:"subsets,omitempty"`
	LoadBalancer string            `json:"loadBalancer,omitempty"` // round_robin (default) | least_request | peak_ewma
	Pool         ConnectionPool    `json:"connectionPool,omitempty"`
	Outlier      *OutlierDetection `json:"outlierDetection,omitempty"`
	HealthCheck  *HealthCheck      `json:"healthCheck,omitempty"`
	// TLS originates TLS to the endpoints (Istio's trafficPolicy.tls);
	// absent or mode DISABLE: plain text.
	TLS *UpstreamTLS `json:"tls,omitempty"`
}

// Endpoint is one upstream address with labels for subsets.
type Endpoint struct {
	Address string            `json:"address"` // ip:port
	Labels  map[string]string `json:"labels,omitempty"`
	// TLSMode is the endpoint's mesh TLS mode (Istio's pod label
	// security.istio.io/tlsMode): "istio" marks a meshed endpoint, which a
	// cluster with automatic mutual TLS (tls.mode ISTIO_MUTUAL,
	// autoMTLS) reaches over mutual TLS; empty or "disabled": plain text.
	TLSMode string `json:"tlsMode,omitempty"`
}

// DNSDiscovery resolves Name to the cluster's endpoints every Refresh.
type DNSDiscovery struct {
	Name    string            `json:"name"`
	Port    uint16            `json:"port"`
	Refresh Duration          `json:"refresh,omitempty"` // default 5s
	Labels  map[string]string `json:"labels,omitempty"`
}

// Subset selects a cluster's endpoints by labels.
type Subset struct {
	Name   string            `json:"name"`
	Labels map[string]string `json:"labels"`
}

// ConnectionPool is the circuit breaker and pooling policy of a cluster.
// Zero means unlimited (or the default where one is given).
type ConnectionPool struct {
	MaxConnections     int      `json:"maxConnections,omitempty"`
	MaxPendingRequests int      `json:"maxPendingRequests,omitempty"`
	MaxRequests        int      `json:"maxRequests,omitempty"`
	MaxIdlePerEndpoint int      `json:"maxIdlePerEndpoint,omitempty"` // default 64
	IdleTimeout        Duration `json:"idleTimeout,omitempty"`        // default 90s
	ConnectTimeout     Duration `json:"connectTimeout,omitempty"`     // default 10s
}

// OutlierDetection ejects endpoints that fail repeatedly.
type OutlierDetection struct {
	Consecutive5xx            int      `json:"consecutive5xx,omitempty"`
	ConsecutiveGatewayErrors  int      `json:"consecutiveGatewayErrors,omitempty"` // 502/503/504 and connect failures
	ConsecutiveConnectFailure int      `json:"consecutiveConnectFailures,omitempty"`
	BaseEjectionTime          Duration `json:"baseEjectionTime,omitempty"` // default 30s, ×number of ejections
	MaxEjectionTime           Duration `json:"maxEjectionTime,omitempty"`  // default 300s
	MaxEjectionPercent        int      `json:"maxEjectionPercent,omitempty"`
}

// HealthCheck actively probes every endpoint: an HTTP GET (2xx is healthy),
// a TCP connect, or a gRPC grpc.health.v1.Health/Check over h2c (SERVING is
// healthy).
type HealthCheck struct {
	Type string `json:"type,omitempty"` // http (default) | tcp | grpc
	Path string `json:"path,omitempty"` // http only; default /healthz
	// ServiceName is the grpc.health.v1 service asked about (grpc only;
	// default "", the server's overall health).
	ServiceName        string   `json:"serviceName,omitempty"`
	Interval           Duration `json:"interval,omitempty"`
	Timeout            Duration `json:"timeout,omitempty"`
	UnhealthyThreshold int      `json:"unhealthyThreshold,omitempty"` // default 2
	HealthyThreshold   int      `json:"healthyThreshold,omitempty"`   // default 1
}

// InboundPolicy is the policy for traffic forwarded to the original
// destination.
type InboundPolicy struct {
	Timeout Duration       `json:"timeout,omitempty"`
	Pool    ConnectionPool `json:"connectionPool,omitempty"`
	// Authorize decides an inbound request r for the original destination
	// dst; policy names the deciding policy (for logs and metrics). Nil
	// allows every request. Set by the xDS client from the inbound
	// listener's RBAC filters, never from a file; inbound only.
	Authorize func(r *http.Request, dst netip.AddrPort) (allowed bool, policy string) `json:"-"`
	// AuthorizeConn decides an inbound TCP connection from src to the
	// original destination dst; cs is its TLS state (nil: plain text). Nil
	// allows every connection. Inbound only, like Authorize.
	AuthorizeConn func(src, dst netip.AddrPort, cs *tls.ConnectionState) (allowed bool, policy string) `json:"-"`
	// MTLS is the inbound PeerAuthentication (inbound only); nil: no
	// inbound TLS termination (bytes pass to the application as sent).
	MTLS *InboundMTLS `json:"mtls,omitempty"`
}

// InboundMTLS is the PeerAuthentication mode of each inbound port:
// STRICT (mutual TLS only; plain text is refused), PERMISSIVE (a TLS
// ClientHello is answered with mutual TLS, anything else is served as
// plain text) or DISABLE (bytes pass as sent).
type InboundMTLS struct {
	// Mode applies to the ports Ports does not name.
	Mode string `json:"mode"`
	// Ports overrides Mode per destination port (Istio's portLevelMtls).
	Ports map[uint16]string `json:"ports,omitempty"`
}

// ModeFor returns the mode of destination port port.
func (m *InboundMTLS) ModeFor(port uint16) string {
	if m == nil {
		return ""
	}
	if v, ok := m.Ports[port]; ok {
		return v
	}
	return m.Mode
}

// AccessLog configures the JSON access log (one line per request).
type AccessLog struct {
	Enabled bool `json:"enabled,omitempty"`
	// SampleRate in [0,1] (default 1 when enabled).
	SampleRate *float64 `json:"sampleRate,omitempty"`
}

// Limits bound downstream clients.
type Limits struct {
	MaxHeaderBytes       int      `json:"maxHeaderBytes,omitempty"`       // default 64KiB
	ReadHeaderTimeout    Duration `json:"readHeaderTimeout,omitempty"`    // default 10s (slowloris)
	IdleTimeout          Duration `json:"idleTimeout,omitempty"`          // default 5m
	MaxConcurrentStreams uint32   `json:"maxConcurrentStreams,omitempty"` // HTTP/2, default 250
}

// Duration is a time.Duration written as a Go duration string ("1.5s").
// A bad value is reported by Validate with its field path.
type Duration struct {
	D   time.Duration
	raw string
	bad bool
}

// D returns a Duration of d.
func D(d time.Duration) Duration { return Duration{D: d} }

// UnmarshalJSON accepts a duration string; the value is checked in Validate
// so that the error names the field.
func (d *Duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		d.raw, d.bad = string(b), true
		return nil
	}
	d.raw = s
	v, err := time.ParseDuration(s)
	if err != nil || v < 0 {
		d.bad = true
		return nil
	}
	d.D, d.bad = v, false
	return nil
}

// MarshalJSON writes the duration string.
func (d Duration) MarshalJSON() ([]byte, error) { return json.Marshal(d.D.String()) }

// ParseL7 parses YAML (or JSON) strictly — unknown fields and duplicate keys
// are errors — and validates it.
func ParseL7(data []byte) (L7, error) {
	var c L7
	if len(bytes.TrimSpace(data)) == 0 {
		return c, nil
	}
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		return L7{}, fmt.Errorf("parsing l7 config: %w", err)
	}
	if err := c.Validate(); err != nil {
		return L7{}, err
	}
	return c, nil
}

// Protocols a port can have.
const (
	ProtoAuto  = "auto"
	ProtoHTTP  = "http"
	ProtoHTTP2 = "http2"
	ProtoGRPC  = "grpc"
	ProtoTCP   = "tcp"
)

// PortProtocol resolves a declared port to a protocol the way Istio does:
// explicit protocol, then appProtocol, then the port-name prefix; "" for an
// unknown name (auto-detect).
func PortProtocol(p PortConfig) (string, error) {
	norm := func(s string) (string, bool) {
		switch strings.ToLower(s) {
		case "http", "http1", "http/1.1", "kubernetes.io/http":
			return ProtoHTTP, true
		case "http2", "h2c", "kubernetes.io/h2c":
			return ProtoHTTP2, true
		case "grpc", "grpc-web":
			return ProtoGRPC, true
		case "tcp", "mongo", "mysql", "redis", "tls", "https", "kubernetes.io/ws", "kubernetes.io/wss":
			if strings.EqualFold(s, "kubernetes.io/ws") {
				return ProtoHTTP, true
			}
			return ProtoTCP, true
		case "auto":
			return ProtoAuto, true
		}
		return "", false
	}
	if p.Protocol != "" {
		v, ok := norm(p.Protocol)
		if !ok {
			return "", fmt.Errorf("protocol %q: must be one of http, http2, grpc, tcp, auto", p.Protocol)
		}
		return v, nil
	}
	if p.AppProtocol != "" {
		if v, ok := norm(p.AppProtocol); ok {
			return v, nil
		}
		// Unknown appProtocol values are opaque to Istio too.
		return ProtoTCP, nil
	}
	if p.Name != "" {
		prefix, _, _ := strings.Cut(p.Name, "-")
		if v, ok := norm(prefix); ok {
			return v, nil
		}
	}
	return ProtoAuto, nil
}

// Files returns every file the configuration reads when it is validated —
// the TLS files (caCertificates, clientCertificate, privateKey) of every
// cluster — sorted, each once. The agent watches them and folds their
// contents into the config hash, so a rotated certificate is a hot restart.
func (c *L7) Files() []string {
	var files []string
	for _, cl := range c.Clusters {
		if t := cl.TLS; t != nil {
			for _, f := range []string{t.CACertificates, t.ClientCertificate, t.PrivateKey} {
				if f != "" {
					files = append(files, f)
				}
			}
		}
	}
	slices.Sort(files)
	return slices.Compact(files)
}

// Validate checks everything and returns all problems, each naming the field
// and value.
func (c *L7) Validate() error { return c.validate(false, nil) }

// ValidateDynamic is Validate for a configuration that arrives in parts at
// run time (the engine's Update, fed by a control plane): a route or mirror
// may name a cluster the configuration does not define yet, and a cluster
// may have no endpoints (a service scaled to zero). The engine answers
// requests routed to them 503 with response flag NC and UH respectively,
// as Envoy does.
func (c *L7) ValidateDynamic() error { return c.validate(true, nil) }

// ValidateDynamicSince is ValidateDynamic for a configuration that
// follows prev, a configuration that passed it: a cluster that is the same
// as prev's of its name (SameCluster), and a service that is the same as
// prev's whose routes name only such clusters (or clusters neither
// defines), are not checked again — an update that changes one of 1,000
// services checks one. The result is ValidateDynamic's.
func (c *L7) ValidateDynamicSince(prev *L7) error { return c.validate(true, prev) }

func (c *L7) validate(dynamic bool, prev *L7) error {
	var errs []error
	bad := func(field string, format string, a ...any) {
		errs = append(errs, fmt.Errorf("%s: %s", field, fmt.Sprintf(format, a...)))
	}
	dur := func(field string, d Duration) {
		if d.bad {
			bad(field, "invalid duration %q (want e.g. \"250ms\", \"2s\", non-negative)", d.raw)
		}
	}
	pct := func(field string, v float64) {
		if v < 0 || v > 100 || v != v {
			bad(field, "%v must be within 0..100", v)
		}
	}
	seenPort := map[uint16]bool{}
	for i, p := range c.Ports {
		f := fmt.Sprintf("ports[%d]", i)
		if p.Port == 0 {
			bad(f+".port", "0 is not a valid port")
		}
		if seenPort[p.Port] {
			bad(f+".port", "%d declared twice", p.Port)
		}
		seenPort[p.Port] = true
		if _, err := PortProtocol(p); err != nil {
			bad(f+".protocol", "%v", err)
		}
	}
	switch c.HTTP2Forwarder {
	case "", H2Frames, H2NetHTTP:
	default:
		bad("http2Forwarder", "%q is not one of %q, %q", c.HTTP2Forwarder, H2Frames, H2NetHTTP)
	}
	dur("detection.timeout", c.Detection.Timeout)
	if t := c.Detection.Timeout; !t.bad && t.raw != "" && (t.D < time.Millisecond || t.D > time.Minute) {
		bad("detection.timeout", "%q must be within 1ms..1m (omit it for the default 5s)", t.raw)
	}

	var prevClusters map[string]*Cluster
	var prevServices map[string]*Service
	if prev != nil {
		prevClusters = make(map[string]*Cluster, len(prev.Clusters))
		for i := range prev.Clusters {
			prevClusters[prev.Clusters[i].Name] = &prev.Clusters[i]
		}
		prevServices = make(map[string]*Service, len(prev.Services))
		for i := range prev.Services {
			prevServices[prev.Services[i].Name] = &prev.Services[i]
		}
	}
	clusters := make(map[string]*Cluster, len(c.Clusters))
	unchanged := map[string]bool{} // clusters the same as prev's
	for i := range c.Clusters {
		cl := &c.Clusters[i]
		if cl.Name == "" {
			bad(fmt.Sprintf("clusters[%d].name", i), "must not be empty")
		} else if clusters[cl.Name] != nil {
			bad(fmt.Sprintf("clusters[%d].name", i), "%q defined twice", cl.Name)
		}
		clusters[cl.Name] = cl
		if p := prevClusters[cl.Name]; p != nil && SameCluster(p, cl) {
			unchanged[cl.Name] = true
			continue
		}
		f := fmt.Sprintf("clusters[%d]", i)
		switch cl.Protocol {
		case "", "auto", "http1", "http2":
		default:
			bad(f+".protocol", "%q must be one of http1, http2, auto", cl.Protocol)
		}
		switch cl.LoadBalancer {
		case "", LBRoundRobin, LBLeastRequest, LBPeakEWMA:
		default:
			bad(f+".loadBalancer", "%q must be one of round_robin, least_request, peak_ewma", cl.LoadBalancer)
		}
		if len(cl.Endpoints) == 0 && cl.DNS == nil && !dynamic {
			bad(f, "cluster %q needs endpoints or dns", cl.Name)
		}
		for j, ep := range cl.Endpoints {
			if _, err := netip.ParseAddrPort(ep.Address); err != nil {
				bad(fmt.Sprintf("%s.endpoints[%d].address", f, j), "%q is not ip:port", ep.Address)
			}
			if ep.TLSMode != "" && ep.TLSMode != EndpointTLSIstio && ep.TLSMode != EndpointTLSDisabled {
				bad(fmt.Sprintf("%s.endpoints[%d].tlsMode", f, j), "%q must be istio or disabled", ep.TLSMode)
			}
		}
		if d := cl.DNS; d != nil {
			if d.Name == "" || strings.ContainsAny(d.Name, " /:") {
				bad(f+".dns.name", "%q is not a DNS name", d.Name)
			}
			if d.Port == 0 {
				bad(f+".dns.port", "must be set")
			}
			dur(f+".dns.refresh", d.Refresh)
		}
		subsets := map[string]bool{}
		for j, s := range cl.Subsets {
			sf := fmt.Sprintf("%s.subsets[%d]", f, j)
			if s.Name == "" || subsets[s.Name] {
				bad(sf+".name", "%q must be non-empty and unique", s.Name)
			}
			subsets[s.Name] = true
			if len(s.Labels) == 0 {
				bad(sf+".labels", "must select at least one label")
			}
		}
		p := cl.Pool
		for name, v := range map[string]int{"maxConnections": p.MaxConnections, "maxPendingRequests": p.MaxPendingRequests,
			"maxRequests": p.MaxRequests, "maxIdlePerEndpoint": p.MaxIdlePerEndpoint} {
			if v < 0 {
				bad(f+".connectionPool."+name, "%d must not be negative", v)
			}
		}
		dur(f+".connectionPool.idleTimeout", p.IdleTimeout)
		dur(f+".connectionPool.connectTimeout", p.ConnectTimeout)
		if o := cl.Outlier; o != nil {
			of := f + ".outlierDetection"
			if o.Consecutive5xx < 0 || o.ConsecutiveGatewayErrors < 0 || o.ConsecutiveConnectFailure < 0 {
				bad(of, "consecutive counts must not be negative")
			}
			if o.Consecutive5xx == 0 && o.ConsecutiveGatewayErrors == 0 && o.ConsecutiveConnectFailure == 0 {
				bad(of, "set at least one of consecutive5xx, consecutiveGatewayErrors, consecutiveConnectFailures")
			}
			dur(of+".baseEjectionTime", o.BaseEjectionTime)
			dur(of+".maxEjectionTime", o.MaxEjectionTime)
			if o.MaxEjectionPercent < 0 || o.MaxEjectionPercent > 100 {
				bad(of+".maxEjectionPercent", "%d must be within 0..100", o.MaxEjectionPercent)
			}
		}
		if cl.TLS != nil {
			_, tlsErrs := cl.LoadTLS(f + ".tls")
			errs = append(errs, tlsErrs...)
		}
		if h := cl.HealthCheck; h != nil {
			hf := f + ".healthCheck"
			switch h.Type {
			case "", "http", "tcp", "grpc":
			default:
				bad(hf+".type", "%q must be http, tcp or grpc", h.Type)
			}
			if h.Path != "" && !strings.HasPrefix(h.Path, "/") {
				bad(hf+".path", "%q must start with /", h.Path)
			}
			if h.Path != "" && (h.Type == "tcp" || h.Type == "grpc") {
				bad(hf+".path", "%q is only valid for type http (type is %s)", h.Path, h.Type)
			}
			if h.ServiceName != "" && h.Type != "grpc" {
				bad(hf+".serviceName", "%q is only valid for type grpc", h.ServiceName)
			}
			if strings.ContainsAny(h.ServiceName, "\x00\r\n") {
				bad(hf+".serviceName", "%q must not contain control characters", h.ServiceName)
			}
			dur(hf+".interval", h.Interval)
			dur(hf+".timeout", h.Timeout)
			if h.Interval.D < 0 || !h.Interval.bad && h.Interval.raw != "" && h.Interval.D == 0 {
				bad(hf+".interval", "%q must be positive", h.Interval.raw)
			}
			if h.UnhealthyThreshold < 0 {
				bad(hf+".unhealthyThreshold", "%d must not be negative", h.UnhealthyThreshold)
			}
			if h.HealthyThreshold < 0 {
				bad(hf+".healthyThreshold", "%d must not be negative", h.HealthyThreshold)
			}
		}
	}

	checkDest := func(field, cluster, subset string) {
		cl := clusters[cluster]
		if cl == nil {
			if !dynamic {
				bad(field+".cluster", "%q is not a defined cluster", cluster)
			}
			return
		}
		if subset == "" {
			return
		}
		for _, s := range cl.Subsets {
			if s.Name == subset {
				return
			}
		}
		bad(field+".subset", "%q is not a subset of cluster %q", subset, cluster)
	}
	checkStr := func(field string, m *StringMatch, header bool) {
		n := 0
		if m.Exact != "" {
			n++
		}
		if m.Prefix != "" {
			n++
		}
		if m.Regex != "" {
			n++
			if _, err := regexp.Compile(m.Regex); err != nil {
				bad(field+".regex", "%q: %v", m.Regex, err)
			}
		}
		if m.Present {
			n++
			if !header {
				bad(field+".present", "only valid for headers")
			}
		}
		if n != 1 {
			bad(field, "set exactly one of exact, prefix, regex%s", map[bool]string{true: ", present"}[header])
		}
	}
	// sameRefs: every cluster the routes of s name is unchanged, or
	// defined by neither configuration.
	sameRefs := func(s *Service) bool {
		ok := func(name string) bool { return unchanged[name] || clusters[name] == nil && prevClusters[name] == nil }
		for j := range s.Routes {
			r := &s.Routes[j]
			for _, d := range r.Destinations {
				if !ok(d.Cluster) {
					return false
				}
			}
			if r.Mirror != nil && !ok(r.Mirror.Cluster) {
				return false
			}
		}
		return true
	}
	svcNames := make(map[string]bool, len(c.Services))
	for i := range c.Services {
		s := &c.Services[i]
		if s.Name == "" || svcNames[s.Name] {
			bad(fmt.Sprintf("services[%d].name", i), "%q must be non-empty and unique", s.Name)
		}
		svcNames[s.Name] = true
		if p := prevServices[s.Name]; p != nil && SameService(p, s) && sameRefs(s) {
			continue
		}
		f := fmt.Sprintf("services[%d]", i)
		if len(s.Hosts) == 0 && len(s.Addresses) == 0 {
			bad(f+".hosts", "a service needs hosts or addresses")
		}
		for j, h := range s.Hosts {
			if h == "" || strings.ContainsAny(h, " /:") || strings.Contains(h[min(1, len(h)):], "*") {
				bad(fmt.Sprintf("%s.hosts[%d]", f, j), "%q is not a host name (a leading \"*.\" wildcard is allowed)", h)
			}
		}
		for j, a := range s.Addresses {
			if _, err := netip.ParseAddr(a); err != nil {
				if _, err := netip.ParsePrefix(a); err != nil {
					bad(fmt.Sprintf("%s.addresses[%d]", f, j), "%q is not an IP address or CIDR", a)
				}
			}
		}
		for j, p := range s.Ports {
			if p.Port == 0 {
				bad(fmt.Sprintf("%s.ports[%d].port", f, j), "0 is not a valid port")
			}
			if _, err := PortProtocol(p); err != nil {
				bad(fmt.Sprintf("%s.ports[%d].protocol", f, j), "%v", err)
			}
		}
		if len(s.Routes) == 0 {
			bad(f+".routes", "a service needs at least one route")
		}
		routeNames := map[string]bool{}
		for j, r := range s.Routes {
			rf := fmt.Sprintf("%s.routes[%d]", f, j)
			if r.Name == "" || routeNames[r.Name] {
				bad(rf+".name", "%q must be non-empty and unique within the service", r.Name)
			}
			routeNames[r.Name] = true
			for k, m := range r.Match {
				mf := fmt.Sprintf("%s.match[%d]", rf, k)
				if m.URI != nil {
					checkStr(mf+".uri", m.URI, false)
					if m.URI.Exact != "" && !strings.HasPrefix(m.URI.Exact, "/") || m.URI.Prefix != "" && !strings.HasPrefix(m.URI.Prefix, "/") {
						bad(mf+".uri", "paths must start with /")
					}
				}
				if m.Authority != nil {
					checkStr(mf+".authority", m.Authority, false)
				}
				if m.Method != "" && !validToken(m.Method) {
					bad(mf+".method", "%q is not an HTTP method", m.Method)
				}
				keys := make([]string, 0, len(m.Headers))
				for k := range m.Headers {
					keys = append(keys, k)
				}
				sort.Strings(keys)
				for _, h := range keys {
					if !validToken(h) {
						bad(mf+".headers", "%q is not a header name", h)
					}
					sm := m.Headers[h]
					checkStr(fmt.Sprintf("%s.headers[%s]", mf, h), &sm, true)
				}
			}
			if len(r.Destinations) == 0 {
				bad(rf+".destinations", "a route needs at least one destination")
			}
			var total uint64
			for k, d := range r.Destinations {
				checkDest(fmt.Sprintf("%s.destinations[%d]", rf, k), d.Cluster, d.Subset)
				total += uint64(d.Weight)
			}
			if len(r.Destinations) > 1 && total == 0 {
				bad(rf+".destinations", "weights of a split must not all be 0")
			}
			if rw := r.Rewrite; rw != nil {
				if rw.URI != "" && !strings.HasPrefix(rw.URI, "/") {
					bad(rf+".rewrite.uri", "%q must start with /", rw.URI)
				}
				if rw.Authority != "" && strings.ContainsAny(rw.Authority, " /\r\n") {
					bad(rf+".rewrite.authority", "%q is not an authority", rw.Authority)
				}
			}
			dur(rf+".timeout", r.Timeout)
			if rp := r.Retries; rp != nil {
				pf := rf + ".retries"
				if rp.Attempts < 0 || rp.Attempts > 10 {
					bad(pf+".attempts", "%d must be within 0..10", rp.Attempts)
				}
				dur(pf+".perTryTimeout", rp.PerTryTimeout)
				dur(pf+".baseInterval", rp.BaseInterval)
				dur(pf+".maxInterval", rp.MaxInterval)
				for k, cond := range rp.RetryOn {
					if _, ok := retryConditions[cond]; !ok {
						if _, err := strconv.Atoi(cond); err != nil {
							bad(fmt.Sprintf("%s.retryOn[%d]", pf, k), "unknown condition %q", cond)
						}
					}
				}
				for k, code := range rp.RetriableStatusCodes {
					if code < 100 || code > 599 {
						bad(fmt.Sprintf("%s.retriableStatusCodes[%d]", pf, k), "%d is not an HTTP status", code)
					}
				}
				if rp.MaxBodyBytes < 0 || rp.MaxBodyBytes > 64<<20 {
					bad(pf+".maxBodyBytes", "%d must be within 0..64MiB", rp.MaxBodyBytes)
				}
				if b := rp.Budget; b != nil {
					if b.Ratio < 0 || b.Ratio > 1000 || b.Ratio != b.Ratio {
						bad(pf+".budget.ratio", "%v must be within 0..1000", b.Ratio)
					}
					if b.MinPerSecond < 0 || b.MinPerSecond != b.MinPerSecond {
						bad(pf+".budget.minPerSecond", "%v must not be negative", b.MinPerSecond)
					}
					dur(pf+".budget.ttl", b.TTL)
				}
			}
			if fl := r.Fault; fl != nil {
				if d := fl.Delay; d != nil {
					dur(rf+".fault.delay.fixed", d.Fixed)
					pct(rf+".fault.delay.percent", d.Percent)
				}
				if a := fl.Abort; a != nil {
					pct(rf+".fault.abort.percent", a.Percent)
					if a.HTTPStatus == 0 && a.GRPCStatus == nil {
						bad(rf+".fault.abort", "set httpStatus or grpcStatus")
					}
					if a.HTTPStatus != 0 && (a.HTTPStatus < 200 || a.HTTPStatus > 599) {
						bad(rf+".fault.abort.httpStatus", "%d must be within 200..599", a.HTTPStatus)
					}
					if a.GRPCStatus != nil && (*a.GRPCStatus < 1 || *a.GRPCStatus > 16) {
						bad(rf+".fault.abort.grpcStatus", "%d must be a non-OK gRPC code (1..16)", *a.GRPCStatus)
					}
				}
			}
			if m := r.Mirror; m != nil {
				checkDest(rf+".mirror", m.Cluster, m.Subset)
				pct(rf+".mirror.percent", m.Percent)
			}
			if h := r.Headers; h != nil {
				for part, ops := range map[string]HeaderOps{"request": h.Request, "response": h.Response} {
					for k := range ops.Set {
						if !validToken(k) {
							bad(rf+".headers."+part+".set", "%q is not a header name", k)
						}
					}
					for k := range ops.Add {
						if !validToken(k) {
							bad(rf+".headers."+part+".add", "%q is not a header name", k)
						}
					}
				}
			}
		}
	}
	if c.Passthrough.Authorize != nil || c.Passthrough.AuthorizeConn != nil {
		bad("passthrough", "authorization applies to inbound traffic only")
	}
	if c.Passthrough.MTLS != nil {
		bad("passthrough.mtls", "peer authentication applies to inbound traffic only")
	}
	if m := c.Inbound.MTLS; m != nil {
		if !validPeerMode(m.Mode) {
			bad("inbound.mtls.mode", "%q must be one of STRICT, PERMISSIVE, DISABLE", m.Mode)
		}
		for _, port := range slices.Sorted(maps.Keys(m.Ports)) {
			if !validPeerMode(m.Ports[port]) {
				bad(fmt.Sprintf("inbound.mtls.ports[%d]", port), "%q must be one of STRICT, PERMISSIVE, DISABLE", m.Ports[port])
			}
		}
	}
	for name, p := range map[string]InboundPolicy{"inbound": c.Inbound, "passthrough": c.Passthrough} {
		dur(name+".timeout", p.Timeout)
		dur(name+".connectionPool.idleTimeout", p.Pool.IdleTimeout)
		dur(name+".connectionPool.connectTimeout", p.Pool.ConnectTimeout)
		if p.Pool.MaxConnections < 0 || p.Pool.MaxRequests < 0 || p.Pool.MaxPendingRequests < 0 || p.Pool.MaxIdlePerEndpoint < 0 {
			bad(name+".connectionPool", "limits must not be negative")
		}
	}
	if r := c.AccessLog.SampleRate; r != nil && (*r < 0 || *r > 1 || *r != *r) {
		bad("accessLog.sampleRate", "%v must be within 0..1", *r)
	}
	if c.Limits.MaxHeaderBytes < 0 {
		bad("limits.maxHeaderBytes", "%d must not be negative", c.Limits.MaxHeaderBytes)
	}
	dur("limits.readHeaderTimeout", c.Limits.ReadHeaderTimeout)
	dur("limits.idleTimeout", c.Limits.IdleTimeout)
	// Sorted for stable messages (map iteration above).
	sort.SliceStable(errs, func(i, j int) bool { return errs[i].Error() < errs[j].Error() })
	return errors.Join(errs...)
}

func validToken(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("!#$%&'*+-.^_`|~", c) >= 0) {
			return false
		}
	}
	return true
}

// Values of L7.HTTP2Forwarder.
const (
	H2Frames  = "frames"
	H2NetHTTP = "nethttp"
)

// Retry conditions (Envoy's x-envoy-retry-on / grpc-retry-on names).
var retryConditions = map[string]struct{}{
	"5xx": {}, "gateway-error": {}, "connect-failure": {}, "reset": {}, "refused-stream": {},
	"retriable-status-codes": {}, "cancelled": {}, "deadline-exceeded": {}, "internal": {},
	"resource-exhausted": {}, "unavailable": {},
}

// Load balancer names.
const (
	LBRoundRobin   = "round_robin"
	LBLeastRequest = "least_request"
	LBPeakEWMA     = "peak_ewma"
)

// Endpoint TLS modes (Endpoint.TLSMode).
const (
	EndpointTLSIstio    = "istio"
	EndpointTLSDisabled = "disabled"
)

// PeerAuthentication modes (InboundMTLS).
const (
	PeerStrict     = "STRICT"
	PeerPermissive = "PERMISSIVE"
	PeerDisable    = "DISABLE"
)

func validPeerMode(m string) bool { return m == PeerStrict || m == PeerPermissive || m == PeerDisable }
