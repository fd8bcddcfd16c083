// Package capturetest generates pod capture annotations for property tests
// of the injector and the CNI plugin: random sets drawn from valid values,
// edge cases (overlapping inclusions and exclusions, the sidecar's own
// ports, loopback) and invalid ones.
package capturetest

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"

	"github.com/meshlet/meshlet/initcni/capture"
)

// Value pools: good (including overlaps and the sidecar's own ports, which
// are admitted with a warning) and bad (refused).
var (
	goodPorts = []string{"80", "8080", "22", "443", "9090", "65535", "080", " 8443 ",
		"15001", "15006", "15008", "15020", "15021", "15090", "15000"}
	badPorts  = []string{"0", "65536", "-1", "http", "1.5", "*"}
	goodCIDRs = []string{"10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/8", "192.168.1.1", "0.0.0.0/0", "127.0.0.1/32",
		"fd00::/8", "fd00:1::/64", "::1/128", "::ffff:10.0.0.0/104"}
	badCIDRs   = []string{"10.0.0.0/33", "::ffff:10.0.0.0/64", "nope", "10.0.0.0/", "*"}
	goodIfaces = []string{"eth0", "eth1", "net1", "veth+", "bond0.100"}
	badIfaces  = []string{"lo", "eth 0", "a/b", "averyveryverylongname", "*"}
	goodModes  = []string{"REDIRECT", "redirect", " REDIRECT", "NONE", "none"}
	badModes   = []string{"TPROXY", "tproxy", "NAT", ""}
)

// pick draws from bad one time in ten, else from good.
func pick(r *rand.Rand, good, bad []string) string {
	if r.IntN(10) == 0 {
		return bad[r.IntN(len(bad))]
	}
	return good[r.IntN(len(good))]
}

// list joins up to three picks, or returns "*" or "" now and then.
func list(r *rand.Rand, good, bad []string) string {
	switch r.IntN(8) {
	case 0:
		return "*"
	case 1:
		return ""
	}
	n := 1 + r.IntN(3)
	items := make([]string, n)
	for i := range items {
		items[i] = pick(r, good, bad)
	}
	return strings.Join(items, ",")
}

// Annotations returns a random set of the capture option set's pod
// annotations: each present with probability one half.
func Annotations(r *rand.Rand) map[string]string {
	ann := map[string]string{}
	for _, opt := range capture.OptionSet {
		if opt.Annotation == "" || r.IntN(2) == 0 {
			continue
		}
		var v string
		switch opt.Field {
		case "InterceptionMode":
			v = pick(r, goodModes, badModes)
		case "OutboundIPRanges", "OutboundIPRangesExclude":
			v = list(r, goodCIDRs, badCIDRs)
		case "ExcludeInterfaces":
			v = list(r, goodIfaces, badIfaces)
		default:
			v = list(r, goodPorts, badPorts)
		}
		ann[opt.Annotation] = v
	}
	return ann
}

// Seeds are fixed annotation sets every property test runs first: the
// cases issue reports named (admitted pods that init then refused).
var Seeds = []map[string]string{
	{capture.AnnotationIncludeInboundPorts: "15021"},
	{capture.AnnotationIncludeInboundPorts: "15020"},
	{capture.AnnotationIncludeInboundPorts: "15006"},
	{capture.AnnotationIncludeInboundPorts: "15001"},
	{capture.AnnotationIncludeInboundPorts: "15008"},
	{capture.AnnotationExcludeInterfaces: "lo"},
	{capture.AnnotationIncludeOutboundPorts: "443", capture.AnnotationExcludeOutboundPorts: "443"},
	{capture.AnnotationIncludeOutboundIPRanges: "10.0.0.0/8", capture.AnnotationExcludeOutboundIPRanges: "10.0.0.0/8"},
	{capture.AnnotationIncludeInboundPorts: "22,80", capture.AnnotationExcludeInboundPorts: "80"},
	{capture.AnnotationInterceptionMode: "NONE", capture.AnnotationIncludeInboundPorts: "http"},
}

// Verdict checks one outcome against the property every reader of capture
// annotations keeps: a pod is refused (err != nil) exactly when one of its
// annotations is refused on its own, and the refusal names each of those —
// as named renders an annotation and its value in the reader's messages —
// and no other. It returns what is wrong, empty when nothing is.
func Verdict(ann map[string]string, err error, refusedAlone func(k, v string) bool, named func(k, v string) string) []string {
	var bad []string
	for k, v := range ann {
		if refusedAlone(k, v) {
			bad = append(bad, k)
		}
	}
	slices.Sort(bad)
	var problems []string
	if err == nil {
		if len(bad) > 0 {
			problems = append(problems, fmt.Sprintf("annotations %q accepted, but %v are refused alone", ann, bad))
		}
		return problems
	}
	if len(bad) == 0 {
		problems = append(problems, fmt.Sprintf("annotations %q refused, but none is refused alone: %v", ann, err))
	}
	for k, v := range ann {
		got, want := strings.Contains(err.Error(), named(k, v)), slices.Contains(bad, k)
		if got != want {
			problems = append(problems, fmt.Sprintf("annotations %q: refusal names %s: %v, want %v:\n%v", ann, k, got, want, err))
		}
	}
	return problems
}
