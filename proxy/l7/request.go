package l7

import (
	"errors"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7/grpcwire"
	"github.com/meshlet/meshlet/proxy/l7/route"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
)

// The per-request decision: every path that serves HTTP — net/http's
// server (ServeHTTP), the HTTP/1.1 codec (which calls ServeHTTP) and the
// HTTP/2 frame forwarder — takes a request through the same steps, in
// Envoy's filter order:
//
//  1. x-request-id: kept, or generated (ensureRequestID, when the request
//     arrives, so even a malformed request's log line has one);
//  2. route choice (table.match): inbound, a service's first matching
//     route, or passthrough; a service without a matching route is 404 NR;
//     on the inbound route, authorization (the RBAC filter runs first):
//     a denied request is answered 403 "RBAC: access denied" (gRPC
//     PERMISSION_DENIED), flag RBAC, counted per deciding policy;
//  3. fault injection (the fault filter runs before the router): a delay,
//     then an abort answered locally (FI);
//  4. the router: the deadline (route timeout, shortened by a client's
//     grpc-timeout), the weighted destination, 503 NC for a cluster the
//     configuration does not define, the retry policy, and a deposit in the
//     route's retry budget — only for a request that goes upstream, so
//     fault aborts and local answers do not earn retries for others;
//  5. request rewrites and header operations (decision.prepare).
//
// Forwarding headers (Forwarded, X-Forwarded-*) pass through unchanged on
// every path. What differs per path is only how it waits (a blocked
// goroutine or a timer) and how it writes the answer.

// decision is the outcome of decide for one request.
type decision struct {
	route   *route.Route       // nil: no route matched (reply says 404 NR)
	dest    *route.Destination // nil when answered locally before the router
	retry   *route.RetryPolicy // nil: one try without a per-try timeout
	timeout time.Duration      // the request's deadline from when it goes upstream; 0: none
	delay   time.Duration      // injected delay before anything else; 0: none
	reply   *localAnswer       // answer locally (after the delay) instead of forwarding
	flags   string             // Envoy response flags so far (NR, DI, FI, NC)
}

// localAnswer is a reply the engine makes without an upstream: an HTTP
// status, or for gRPC a trailers-only status with grpcCode.
type localAnswer struct {
	status   int
	grpcCode int
	msg      string
	// exact: the HTTP body is msg as is, without the trailing newline
	// (Envoy's RBAC denial body).
	exact bool
}

// errRouteTimeout ends a request whose route timeout passed.
var errRouteTimeout = errors.New("upstream request timeout")

// rbacDeniedBody is the body of a request the inbound authorization
// denies (Envoy's RBAC filter's).
const rbacDeniedBody = "RBAC: access denied"

// ensureRequestID gives a request without x-request-id a random UUIDv4 (as
// Envoy does), so the access logs of every hop share it. It returns the id
// generated, "" when the request had one.
func ensureRequestID(h http.Header) string {
	if _, ok := h["X-Request-Id"]; ok {
		return ""
	}
	id := newRequestID()
	h["X-Request-Id"] = []string{id}
	return id
}

// match chooses the route of a request to dst in direction dir; nil means
// a service claimed the request but none of its routes matched.
func (t *table) match(r *http.Request, host string, dir l4.Direction, dst netip.AddrPort) *route.Route {
	if dir == l4.Inbound {
		return t.inboundRoute
	}
	svc := route.Find(t.services, host, dst)
	if svc == nil {
		return t.passRoute
	}
	for _, cand := range svc.Routes {
		if cand.Matches(r, host) {
			return cand
		}
	}
	return nil
}

// decide takes a request for the original destination dst on route rt
// (nil: none matched) through authorization, fault injection and the
// router's decisions. It counts what it decides (denials, fault and
// no-cluster metrics, the retry budget deposit); the caller waits the
// delay, then answers reply or forwards.
func (p *Engine) decide(rt *route.Route, r *http.Request, grpc bool, dst netip.AddrPort) decision {
	if rt == nil {
		return decision{flags: "NR", reply: &localAnswer{status: http.StatusNotFound, grpcCode: 12, msg: "no route matched"}} // UNIMPLEMENTED
	}
	dc := decision{route: rt}
	if rt.Authorize != nil {
		if ok, policy := rt.Authorize(r, dst); !ok {
			p.m.rbacDenied.WithLabelValues(policy).Inc()
			dc.flags = "RBAC"
			dc.reply = &localAnswer{status: http.StatusForbidden, grpcCode: 7, msg: rbacDeniedBody, exact: true} // PERMISSION_DENIED
			return dc
		}
	}
	if rt.Inbound {
		p.setXFCC(r)
	}
	cfg := rt.Config
	if f := cfg.Fault; f != nil {
		if d := f.Delay; d != nil && hit(d.Percent) {
			dc.flags = addFlag(dc.flags, "DI")
			p.m.fault(rt.Key, "delay")
			dc.delay = d.Fixed.D
		}
		if a := f.Abort; a != nil && hit(a.Percent) {
			dc.flags = addFlag(dc.flags, "FI")
			p.m.fault(rt.Key, "abort")
			ans := &localAnswer{status: a.HTTPStatus, grpcCode: 14, msg: "fault filter abort"}
			if a.GRPCStatus != nil {
				ans.grpcCode = *a.GRPCStatus
			}
			if ans.status == 0 {
				ans.status = http.StatusServiceUnavailable
			}
			dc.reply = ans
			return dc
		}
	}
	dc.timeout = cfg.Timeout.D
	if grpc {
		if gt, ok := grpcwire.ParseTimeout(r.Header.Get("Grpc-Timeout")); ok && (dc.timeout == 0 || gt < dc.timeout) {
			dc.timeout = gt
		}
	}
	dc.dest = rt.PickDest()
	if dc.dest.Cluster == nil {
		dc.flags = addFlag(dc.flags, "NC")
		p.m.noCluster.Inc()
		dc.reply = &localAnswer{status: http.StatusServiceUnavailable, grpcCode: 14, msg: "no cluster " + strconv.Quote(dc.dest.Name)}
		return dc
	}
	dc.retry = rt.Retry
	rt.Budget.Deposit()
	return dc
}

// prepare applies the route's request rewrites and header operations to r
// (a request that is forwarded).
func (dc *decision) prepare(r *http.Request, host string) {
	cfg := dc.route.Config
	dc.route.Rewrite(r, host)
	if h := cfg.Headers; h != nil {
		route.ApplyHeaderOps(r.Header, &h.Request)
	}
}

// metricsCluster is the cluster a finished request is counted under: its
// destination's, or for a request answered before a destination was picked
// (fault abort) the route's first.
func (st *reqState) metricsCluster() *upstream.Cluster {
	if st.dest != nil {
		return st.dest.Cluster
	}
	if st.route != nil && len(st.route.Dests) > 0 {
		return st.route.Dests[0].Cluster
	}
	return nil
}
