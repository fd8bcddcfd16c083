package translate

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"

	"google.golang.org/protobuf/types/known/durationpb"
	networking "istio.io/api/networking/v1alpha3"
)

// retryConditions are the retryOn names the engine honours (docs/xds.md).
var retryConditions = map[string]bool{
	"5xx": true, "gateway-error": true, "connect-failure": true, "reset": true, "refused-stream": true,
	"retriable-status-codes": true, "cancelled": true, "deadline-exceeded": true, "internal": true,
	"resource-exhausted": true, "unavailable": true,
}

// grpcRetryConditions are the ones grpc-go honours (gRFC A44).
var grpcRetryConditions = map[string]bool{
	"cancelled": true, "deadline-exceeded": true, "internal": true, "resource-exhausted": true, "unavailable": true,
}

// grpcCodes maps gRPC status names to codes.
var grpcCodes = map[string]uint32{
	"CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
	"ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
	"ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14,
	"DATA_LOSS": 15, "UNAUTHENTICATED": 16,
}

func validDur(d *durationpb.Duration) bool {
	return d == nil || (d.CheckValid() == nil && d.AsDuration() >= 0)
}

func fmtDur(d *durationpb.Duration) string {
	if d == nil {
		return ""
	}
	return d.AsDuration().String()
}

func validPercent(p *networking.Percent) bool {
	return p == nil || p.Value >= 0 && p.Value <= 100 && p.Value == p.Value
}

func checkStringMatch(field string, m *networking.StringMatch, errs *[]string) {
	if m == nil {
		return
	}
	if r, ok := m.MatchType.(*networking.StringMatch_Regex); ok {
		if _, err := regexp.Compile(r.Regex); err != nil {
			*errs = append(*errs, fmt.Sprintf("%s.regex: %q is not a valid RE2 expression: %v", field, r.Regex, err))
		}
	}
}

// validateVS checks the values of a VirtualService whose fields are all
// supported; each problem names the field and value.
func validateVS(vs *networking.VirtualService) []string {
	var errs []string
	bad := func(format string, a ...any) { errs = append(errs, fmt.Sprintf(format, a...)) }
	if len(vs.Hosts) == 0 {
		bad("spec.hosts: at least one host is needed")
	}
	for i, h := range vs.Http {
		f := fmt.Sprintf("spec.http[%d]", i)
		n := 0
		if len(h.Route) > 0 {
			n++
		}
		if h.Redirect != nil {
			n++
		}
		if h.DirectResponse != nil {
			n++
		}
		if n != 1 {
			bad("%s: set exactly one of route, redirect, directResponse", f)
		}
		for j, m := range h.Match {
			mf := fmt.Sprintf("%s.match[%d]", f, j)
			checkStringMatch(mf+".uri", m.Uri, &errs)
			checkStringMatch(mf+".method", m.Method, &errs)
			checkStringMatch(mf+".authority", m.Authority, &errs)
			for k, v := range m.Headers {
				checkStringMatch(mf+".headers["+k+"]", v, &errs)
			}
			for k, v := range m.QueryParams {
				checkStringMatch(mf+".queryParams["+k+"]", v, &errs)
			}
			for k, v := range m.WithoutHeaders {
				checkStringMatch(mf+".withoutHeaders["+k+"]", v, &errs)
			}
			if m.Port > 65535 {
				bad("%s.port: %d is not a port", mf, m.Port)
			}
		}
		for j, r := range h.Route {
			rf := fmt.Sprintf("%s.route[%d]", f, j)
			if r.Destination == nil || r.Destination.Host == "" {
				bad("%s.destination.host: must be set", rf)
			}
			if r.Weight < 0 {
				bad("%s.weight: %d must not be negative", rf, r.Weight)
			}
		}
		if !validDur(h.Timeout) {
			bad("%s.timeout: %s must be a non-negative duration", f, fmtDur(h.Timeout))
		}
		if rp := h.Retries; rp != nil {
			if rp.Attempts < 0 {
				bad("%s.retries.attempts: %d must not be negative", f, rp.Attempts)
			}
			if !validDur(rp.PerTryTimeout) {
				bad("%s.retries.perTryTimeout: %s must be a non-negative duration", f, fmtDur(rp.PerTryTimeout))
			}
			if !validDur(rp.Backoff) {
				bad("%s.retries.backoff: %s must be a non-negative duration", f, fmtDur(rp.Backoff))
			}
			for _, c := range splitList(rp.RetryOn) {
				if _, err := strconv.Atoi(c); err == nil {
					continue
				}
				if !retryConditions[c] {
					bad("%s.retries.retryOn: unknown condition %q", f, c)
				}
			}
		}
		if fl := h.Fault; fl != nil {
			if d := fl.Delay; d != nil {
				if d.Percent != 0 {
					bad("%s.fault.delay.percent: deprecated integer percent not supported (use percentage)", f)
				}
				if !validPercent(d.Percentage) {
					bad("%s.fault.delay.percentage.value: %v must be within 0..100", f, d.Percentage.Value)
				}
				if fd, ok := d.HttpDelayType.(*networking.HTTPFaultInjection_Delay_FixedDelay); !ok || !validDur(fd.FixedDelay) || fd.FixedDelay == nil {
					bad("%s.fault.delay.fixedDelay: must be a non-negative duration", f)
				}
			}
			if a := fl.Abort; a != nil {
				if !validPercent(a.Percentage) {
					bad("%s.fault.abort.percentage.value: %v must be within 0..100", f, a.Percentage.Value)
				}
				switch e := a.ErrorType.(type) {
				case *networking.HTTPFaultInjection_Abort_HttpStatus:
					if e.HttpStatus < 200 || e.HttpStatus > 599 {
						bad("%s.fault.abort.httpStatus: %d must be within 200..599", f, e.HttpStatus)
					}
				case *networking.HTTPFaultInjection_Abort_GrpcStatus:
					if c, ok := grpcCodes[e.GrpcStatus]; !ok || c == 0 {
						bad("%s.fault.abort.grpcStatus: %q is not a gRPC status name (e.g. UNAVAILABLE)", f, e.GrpcStatus)
					}
				default:
					bad("%s.fault.abort: set httpStatus or grpcStatus", f)
				}
			}
		}
		if !validPercent(h.MirrorPercentage) {
			bad("%s.mirrorPercentage.value: %v must be within 0..100", f, h.MirrorPercentage.Value)
		}
		for j, mp := range h.Mirrors {
			if !validPercent(mp.Percentage) {
				bad("%s.mirrors[%d].percentage.value: %v must be within 0..100", f, j, mp.Percentage.Value)
			}
		}
		if rw := h.Rewrite; rw != nil {
			if rw.Uri != "" && rw.UriRegexRewrite != nil {
				bad("%s.rewrite: set uri or uriRegexRewrite, not both", f)
			}
			if rr := rw.UriRegexRewrite; rr != nil {
				if _, err := regexp.Compile(rr.Match); err != nil {
					bad("%s.rewrite.uriRegexRewrite.match: %q is not a valid RE2 expression: %v", f, rr.Match, err)
				}
			}
		}
		if rd := h.Redirect; rd != nil {
			switch rd.RedirectCode {
			case 0, 301, 302, 303, 307, 308:
			default:
				bad("%s.redirect.redirectCode: %d must be one of 301, 302, 303, 307, 308", f, rd.RedirectCode)
			}
		}
		if dr := h.DirectResponse; dr != nil && (dr.Status < 200 || dr.Status > 599) {
			bad("%s.directResponse.status: %d must be within 200..599", f, dr.Status)
		}
	}
	return errs
}

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// drProblem is a refusal of a DestinationRule with its reason.
type drProblem struct{ reason, msg string }

func validateTrafficPolicy(f string, tp *networking.TrafficPolicy, out *[]drProblem) {
	if tp == nil {
		return
	}
	validatePolicyParts(f, tp.LoadBalancer, tp.ConnectionPool, tp.OutlierDetection, tp.Tls, out)
	for i, pl := range tp.PortLevelSettings {
		pf := fmt.Sprintf("%s.portLevelSettings[%d]", f, i)
		if pl.Port == nil || pl.Port.Number == 0 || pl.Port.Number > 65535 {
			*out = append(*out, drProblem{ReasonInvalid, pf + ".port.number: must be a port"})
		}
		validatePolicyParts(pf, pl.LoadBalancer, pl.ConnectionPool, pl.OutlierDetection, pl.Tls, out)
	}
}

func validatePolicyParts(f string, lb *networking.LoadBalancerSettings, cp *networking.ConnectionPoolSettings,
	od *networking.OutlierDetection, tls *networking.ClientTLSSettings, out *[]drProblem) {
	bad := func(reason, format string, a ...any) {
		*out = append(*out, drProblem{reason, fmt.Sprintf(format, a...)})
	}
	if lb != nil {
		switch lb.GetSimple() {
		case networking.LoadBalancerSettings_UNSPECIFIED, networking.LoadBalancerSettings_ROUND_ROBIN,
			networking.LoadBalancerSettings_LEAST_REQUEST, networking.LoadBalancerSettings_LEAST_CONN:
		default:
			bad(ReasonUnsupported, "%s.loadBalancer.simple: %s not supported (ROUND_ROBIN, LEAST_REQUEST)", f, lb.GetSimple())
		}
	}
	if cp != nil {
		if t := cp.Tcp; t != nil {
			if t.MaxConnections < 0 {
				bad(ReasonInvalid, "%s.connectionPool.tcp.maxConnections: %d must not be negative", f, t.MaxConnections)
			}
			if !validDur(t.ConnectTimeout) {
				bad(ReasonInvalid, "%s.connectionPool.tcp.connectTimeout: %s must be a non-negative duration", f, fmtDur(t.ConnectTimeout))
			}
		}
		if h := cp.Http; h != nil {
			for name, v := range map[string]int32{"http1MaxPendingRequests": h.Http1MaxPendingRequests, "http2MaxRequests": h.Http2MaxRequests,
				"maxRequestsPerConnection": h.MaxRequestsPerConnection, "maxRetries": h.MaxRetries} {
				if v < 0 {
					bad(ReasonInvalid, "%s.connectionPool.http.%s: %d must not be negative", f, name, v)
				}
			}
			if !validDur(h.IdleTimeout) {
				bad(ReasonInvalid, "%s.connectionPool.http.idleTimeout: %s must be a non-negative duration", f, fmtDur(h.IdleTimeout))
			}
		}
	}
	if od != nil {
		if od.MaxEjectionPercent < 0 || od.MaxEjectionPercent > 100 {
			bad(ReasonInvalid, "%s.outlierDetection.maxEjectionPercent: %d must be within 0..100", f, od.MaxEjectionPercent)
		}
		for name, d := range map[string]*durationpb.Duration{"interval": od.Interval, "baseEjectionTime": od.BaseEjectionTime} {
			if !validDur(d) {
				bad(ReasonInvalid, "%s.outlierDetection.%s: %s must be a non-negative duration", f, name, fmtDur(d))
			}
		}
		if od.SplitExternalLocalOriginErrors && od.ConsecutiveLocalOriginFailures == nil {
			bad(ReasonInvalid, "%s.outlierDetection.splitExternalLocalOriginErrors: needs consecutiveLocalOriginFailures", f)
		}
	}
	if tls != nil {
		switch tls.Mode {
		case networking.ClientTLSSettings_DISABLE, networking.ClientTLSSettings_SIMPLE:
		case networking.ClientTLSSettings_MUTUAL:
			if tls.ClientCertificate == "" || tls.PrivateKey == "" {
				bad(ReasonInvalid, "%s.tls: mode MUTUAL needs clientCertificate and privateKey", f)
			}
		case networking.ClientTLSSettings_ISTIO_MUTUAL:
			if tls.CaCertificates != "" || tls.ClientCertificate != "" || tls.PrivateKey != "" || tls.CredentialName != "" {
				bad(ReasonInvalid, "%s.tls: mode ISTIO_MUTUAL uses the workload certificate; caCertificates, clientCertificate, privateKey and credentialName must not be set", f)
			}
		}
		if tls.GetInsecureSkipVerify().GetValue() && (tls.CaCertificates != "" || len(tls.SubjectAltNames) > 0) {
			bad(ReasonInvalid, "%s.tls.insecureSkipVerify: not with caCertificates or subjectAltNames", f)
		}
	}
}

func validateDR(dr *networking.DestinationRule) []drProblem {
	var out []drProblem
	if dr.Host == "" {
		out = append(out, drProblem{ReasonInvalid, "spec.host: must be set"})
	}
	validateTrafficPolicy("spec.trafficPolicy", dr.TrafficPolicy, &out)
	seen := map[string]bool{}
	for i, s := range dr.Subsets {
		f := fmt.Sprintf("spec.subsets[%d]", i)
		if s.Name == "" || seen[s.Name] {
			out = append(out, drProblem{ReasonInvalid, fmt.Sprintf("%s.name: %q must be non-empty and unique", f, s.Name)})
		}
		seen[s.Name] = true
		validateTrafficPolicy(f+".trafficPolicy", s.TrafficPolicy, &out)
	}
	return out
}
