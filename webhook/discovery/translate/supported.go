package translate

import (
	"fmt"
	"sort"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// unsupportedFields walks the set fields of msg and returns the display path
// (e.g. "spec.http[1].corsPolicy") of every one whose normalized path (JSON
// names, no indexes, "*" for map values) is not in allowed. Well-known
// wrapper and duration messages are leaves. The walk stops at the first
// unsupported field of a branch, so one message names each field once.
func unsupportedFields(msg proto.Message, allowed map[string]bool) []string {
	var out []string
	walkSet(msg.ProtoReflect(), "", "spec", allowed, &out)
	sort.Strings(out)
	return out
}

func walkSet(m protoreflect.Message, norm, disp string, allowed map[string]bool, out *[]string) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		n := fd.JSONName()
		if norm != "" {
			n = norm + "." + n
		}
		d := disp + "." + fd.JSONName()
		if !allowed[n] {
			*out = append(*out, d)
			return true
		}
		switch {
		case fd.IsList() && fd.Message() != nil && !leaf(fd.Message()):
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				walkSet(l.Get(i).Message(), n, fmt.Sprintf("%s[%d]", d, i), allowed, out)
			}
		case fd.IsMap() && fd.MapValue().Message() != nil && !leaf(fd.MapValue().Message()):
			keys := []string{}
			vals := map[string]protoreflect.Message{}
			v.Map().Range(func(k protoreflect.MapKey, mv protoreflect.Value) bool {
				keys = append(keys, k.String())
				vals[k.String()] = mv.Message()
				return true
			})
			sort.Strings(keys)
			for _, k := range keys {
				walkSet(vals[k], n+".*", fmt.Sprintf("%s[%s]", d, k), allowed, out)
			}
		case !fd.IsList() && !fd.IsMap() && fd.Message() != nil && !leaf(fd.Message()):
			walkSet(v.Message(), n, d, allowed, out)
		}
		return true
	})
}

func leaf(md protoreflect.MessageDescriptor) bool {
	return strings.HasPrefix(string(md.FullName()), "google.protobuf.")
}

// paths expands "a.{b,c.{d,e}}" style shorthand into a set.
func paths(specs ...string) map[string]bool {
	out := map[string]bool{}
	for _, s := range specs {
		for _, p := range expand(s) {
			// Every prefix of an allowed path is allowed too.
			parts := strings.Split(p, ".")
			for i := 1; i <= len(parts); i++ {
				out[strings.Join(parts[:i], ".")] = true
			}
		}
	}
	return out
}

func expand(s string) []string {
	i := strings.IndexByte(s, '{')
	if i < 0 {
		return []string{s}
	}
	depth, j := 0, i
	for ; j < len(s); j++ {
		if s[j] == '{' {
			depth++
		} else if s[j] == '}' {
			depth--
			if depth == 0 {
				break
			}
		}
	}
	prefix, body, rest := s[:i], s[i+1:j], s[j+1:]
	var alts []string
	depth, start := 0, 0
	for k := 0; k < len(body); k++ {
		switch body[k] {
		case '{':
			depth++
		case '}':
			depth--
		case ',':
			if depth == 0 {
				alts = append(alts, body[start:k])
				start = k + 1
			}
		}
	}
	alts = append(alts, body[start:])
	var out []string
	for _, a := range alts {
		out = append(out, expand(prefix+a+rest)...)
	}
	return out
}

const (
	strMatch       = "{exact,prefix,regex}"
	destination    = "{host,subset,port.number}"
	headerOpFields = "{request,response}.{set,add,remove}"
	percent        = "value"
)

var (
	virtualServiceFields = paths(
		"hosts", "gateways",
		"http.name",
		"http.match.{name,statPrefix,ignoreUriCase,port,sourceLabels,sourceNamespace,gateways}",
		"http.match.{uri,method,authority}."+strMatch,
		"http.match.{headers,queryParams,withoutHeaders}.*."+strMatch,
		"http.route.{weight,destination."+destination+",headers."+headerOpFields+"}",
		"http.redirect.{uri,authority,port,scheme,redirectCode}",
		"http.directResponse.{status,body.string}",
		"http.rewrite.{uri,authority,uriRegexRewrite.{match,rewrite}}",
		"http.timeout",
		"http.retries.{attempts,perTryTimeout,retryOn,backoff}",
		"http.fault.delay.{fixedDelay,percentage."+percent+"}",
		"http.fault.abort.{httpStatus,grpcStatus,percentage."+percent+"}",
		"http.mirror."+destination, "http.mirrorPercentage."+percent,
		"http.mirrors.{destination."+destination+",percentage."+percent+"}",
		"http.headers."+headerOpFields,
	)
	trafficPolicyFields = []string{
		"loadBalancer.simple",
		"connectionPool.tcp.{maxConnections,connectTimeout}",
		"connectionPool.http.{http1MaxPendingRequests,http2MaxRequests,maxRequestsPerConnection,maxRetries,idleTimeout,h2UpgradePolicy}",
		"outlierDetection.{consecutive5xxErrors,consecutiveGatewayErrors,consecutiveLocalOriginFailures,splitExternalLocalOriginErrors,interval,baseEjectionTime,maxEjectionPercent}",
		"tls.{mode,clientCertificate,privateKey,caCertificates,subjectAltNames,sni,insecureSkipVerify}",
	}
	destinationRuleFields = paths(append(append(append([]string{"host", "subsets.{name,labels}"},
		prefixed("trafficPolicy.", trafficPolicyFields)...),
		prefixed("trafficPolicy.portLevelSettings.", append([]string{"port.number"}, trafficPolicyFields...))...),
		prefixed("subsets.trafficPolicy.", trafficPolicyFields)...)...)
	serviceEntryFields = paths("hosts", "addresses", "ports.{number,protocol,name,targetPort}",
		"location", "resolution", "endpoints.{address,ports,labels}")
	sidecarFields = paths("workloadSelector.labels", "egress.hosts", "outboundTrafficPolicy.mode")
)

func prefixed(p string, ss []string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = p + s
	}
	return out
}
