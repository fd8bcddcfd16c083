package inject

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Interception modes of `meshlet init -m`.
const (
	ModeRedirect = "REDIRECT"
	ModeTProxy   = "TPROXY"
)

// Fixed ports of the proxy (docs/design.md section 2).
const (
	OutboundCapturePort = 15001
	InboundCapturePort  = 15006
	StatusPort          = 15020
	HealthPort          = 15021
	PrometheusPort      = 15090
)

// proxyPorts are always excluded from inbound capture, in this order.
var proxyPorts = []string{"15090", "15021", "15020"}

// splitList splits a comma-separated list, trimming blanks and dropping
// empty items.
func splitList(s string) []string {
	if strings.TrimSpace(s) == "" {
		return nil
	}
	parts := strings.Split(s, ",")
	out := parts[:0]
	for _, p := range parts {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

// parsePorts normalizes a comma-separated port list ("" is the empty list).
func parsePorts(s string) (string, error) {
	items := splitList(s)
	for _, p := range items {
		n, err := strconv.Atoi(p)
		if err != nil || n < 1 || n > 65535 {
			return "", fmt.Errorf("%q is not a port (1-65535)", p)
		}
		if strconv.Itoa(n) != p {
			return "", fmt.Errorf("%q is not a port in canonical form", p)
		}
	}
	return strings.Join(items, ","), nil
}

// parsePortsOrStar is parsePorts that also takes "*" (every port).
func parsePortsOrStar(s string) (string, error) {
	if strings.TrimSpace(s) == "*" {
		return "*", nil
	}
	return parsePorts(s)
}

// parseCIDRs normalizes a comma-separated CIDR list (IPv4 or IPv6).
func parseCIDRs(s string) (string, error) {
	items := splitList(s)
	for _, c := range items {
		if _, err := netip.ParsePrefix(c); err != nil {
			return "", fmt.Errorf("%q is not a CIDR (e.g. 10.0.0.0/8)", c)
		}
	}
	return strings.Join(items, ","), nil
}

// parseCIDRsOrStar is parseCIDRs that also takes "*" (every address).
func parseCIDRsOrStar(s string) (string, error) {
	if strings.TrimSpace(s) == "*" {
		return "*", nil
	}
	return parseCIDRs(s)
}

// parseInterfaces normalizes a comma-separated list of interface names.
func parseInterfaces(s string) (string, error) {
	items := splitList(s)
	for _, n := range items {
		if len(n) > 15 || n == "." || n == ".." || strings.ContainsAny(n, "/ \t\n:*\"'") {
			return "", fmt.Errorf("%q is not a network interface name", n)
		}
	}
	return strings.Join(items, ","), nil
}

// mergePorts joins port lists in order, without duplicates.
func mergePorts(lists ...[]string) string {
	var out []string
	seen := map[string]bool{}
	for _, l := range lists {
		for _, p := range l {
			if !seen[p] {
				seen[p] = true
				out = append(out, p)
			}
		}
	}
	return strings.Join(out, ",")
}

// captureSettings are the resolved `meshlet init` flags of one pod.
type captureSettings struct {
	mode                    string
	includeInboundPorts     string
	excludeInboundPorts     string // including the proxy's own ports
	includeOutboundIPRanges string
	excludeOutboundIPRanges string
	includeOutboundPorts    string
	excludeOutboundPorts    string
	excludeInterfaces       string
}

// args renders the capture flags, every one explicit, istio-iptables style.
func (c captureSettings) args(uid, gid int64) []string {
	return []string{
		"-p", strconv.Itoa(OutboundCapturePort),
		"-z", strconv.Itoa(InboundCapturePort),
		"-u", strconv.FormatInt(uid, 10),
		"-g", strconv.FormatInt(gid, 10),
		"-m", c.mode,
		"-i", c.includeOutboundIPRanges,
		"-x", c.excludeOutboundIPRanges,
		"-b", c.includeInboundPorts,
		"-d", c.excludeInboundPorts,
		"-q", c.includeOutboundPorts,
		"-o", c.excludeOutboundPorts,
		"-c", c.excludeInterfaces,
	}
}
