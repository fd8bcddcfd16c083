// Package capture turns meshlet's traffic-capture options (istio-iptables'
// flags and their `*`/empty semantics) into a validated Config, the Config
// into a typed rule model per IP family, and the model into one
// iptables-restore input per family. It applies the rules atomically inside
// a network namespace, reads them back with iptables-save and compares, and
// removes exactly its own rules again. docs/design.md section 4 is the
// specification of the default rule set.
//
// Configuration flows one way: Options (strings, as given by flags, env or
// pod annotations) → BuildConfig (collects every problem) → Config → Rules →
// Render / Apply. Nothing in this package reads flags or the environment.
package capture

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"slices"
	"strconv"
	"strings"
)

// Default values of Options, matching docs/design.md section 2 and 4.
const (
	DefaultProxyPort           = "15001"
	DefaultInboundCapturePort  = "15006"
	DefaultProxyUID            = "1337"
	DefaultProxyGID            = "1337"
	DefaultInterceptionMode    = "REDIRECT"
	DefaultInboundPorts        = "*"
	DefaultInboundPortsExclude = "22,15090,15021,15020"
	DefaultOutboundIPRanges    = "*"

	// TunnelPort is always excluded from inbound capture (and from the
	// loopback hairpin), whatever the options say.
	TunnelPort = 15008
	// ValidationPort is the port the capture validation probe dials.
	ValidationPort = 15002
)

// Mode is the inbound interception mode.
type Mode string

// Interception modes. Only ModeRedirect is implemented; ModeTProxy is
// recognised so it can be rejected with a clear message.
const (
	ModeRedirect Mode = "REDIRECT"
	ModeTProxy   Mode = "TPROXY"
)

// IPv6Mode says whether IPv6 rules are applied.
type IPv6Mode string

// IPv6 modes: auto applies IPv6 rules when the target namespace has a
// global IPv6 address on a non-loopback interface.
const (
	IPv6Auto IPv6Mode = "auto"
	IPv6On   IPv6Mode = "on"
	IPv6Off  IPv6Mode = "off"
)

// Options are the capture options as text, exactly as istio-iptables takes
// them. For the list options "*" means all and "" means none. The zero value
// is not the default: start from NewOptions.
type Options struct {
	ProxyPort               string // -p: outbound capture (proxy) port
	InboundCapturePort      string // -z: inbound capture port
	ProxyUID                string // -u: proxy UID(s), comma separated
	ProxyGID                string // -g: proxy GID(s), comma separated
	InterceptionMode        string // -m: REDIRECT or TPROXY
	InboundPorts            string // -b: "*", "" or port list
	InboundPortsExclude     string // -d: port list (15008 is always added)
	OutboundIPRanges        string // -i: "*", "" or CIDR list
	OutboundIPRangesExclude string // -x: CIDR list
	OutboundPorts           string // -q: port list captured regardless of -i
	OutboundPortsExclude    string // -o: port list
	ExcludeInterfaces       string // -c: interface list
	IPv6                    string // auto (default), on, off
}

// NewOptions returns the default options: docs/design.md section 4's rule set.
func NewOptions() Options {
	return Options{
		ProxyPort:           DefaultProxyPort,
		InboundCapturePort:  DefaultInboundCapturePort,
		ProxyUID:            DefaultProxyUID,
		ProxyGID:            DefaultProxyGID,
		InterceptionMode:    DefaultInterceptionMode,
		InboundPorts:        DefaultInboundPorts,
		InboundPortsExclude: DefaultInboundPortsExclude,
		OutboundIPRanges:    DefaultOutboundIPRanges,
		IPv6:                string(IPv6Auto),
	}
}

// Config is the validated capture configuration.
type Config struct {
	ProxyPort          uint16
	InboundCapturePort uint16
	ProxyUIDs          []uint32
	ProxyGIDs          []uint32
	Mode               Mode

	// InboundAll captures every inbound TCP port except InboundExclude;
	// otherwise only InboundPorts are captured (none if empty).
	InboundAll     bool
	InboundPorts   []uint16
	InboundExclude []uint16 // always starts with TunnelPort

	// OutboundAll captures all outbound TCP except OutboundExclude;
	// otherwise only OutboundRanges (none if empty).
	OutboundAll          bool
	OutboundRanges       []netip.Prefix
	OutboundExclude      []netip.Prefix
	OutboundPorts        []uint16
	OutboundPortsExclude []uint16
	ExcludeInterfaces    []string
	IPv6                 IPv6Mode
}

// FlagNames maps an Options field to the flag that sets it, for messages.
var flagNames = map[string]string{
	"ProxyPort":               "--proxy-port (-p)",
	"InboundCapturePort":      "--inbound-capture-port (-z)",
	"ProxyUID":                "--proxy-uid (-u)",
	"ProxyGID":                "--proxy-gid (-g)",
	"InterceptionMode":        "--interception-mode (-m)",
	"InboundPorts":            "--inbound-ports (-b)",
	"InboundPortsExclude":     "--inbound-ports-exclude (-d)",
	"OutboundIPRanges":        "--outbound-ip-ranges (-i)",
	"OutboundIPRangesExclude": "--outbound-ip-ranges-exclude (-x)",
	"OutboundPorts":           "--outbound-ports (-q)",
	"OutboundPortsExclude":    "--outbound-ports-exclude (-o)",
	"ExcludeInterfaces":       "--exclude-interfaces (-c)",
	"IPv6":                    "--ipv6",
}

// Namer names an option in error messages. The CLI names flags; the CNI
// plugin names pod annotations.
type Namer func(field string) string

// FlagNamer names options by their meshlet init flag.
func FlagNamer(field string) string {
	if n, ok := flagNames[field]; ok {
		return n
	}
	return field
}

// ErrInvalidOptions is wrapped by every BuildConfig error.
var ErrInvalidOptions = errors.New("invalid capture options")

// BuildConfig validates o and converts it into a Config, collecting every
// problem; each names the flag and the offending value.
func BuildConfig(o Options) (Config, error) { return BuildConfigNamed(o, FlagNamer) }

// BuildConfigNamed is BuildConfig with problems named by name.
func BuildConfigNamed(o Options, name Namer) (Config, error) {
	var errs []error
	bad := func(field, value, format string, args ...any) {
		errs = append(errs, fmt.Errorf("%s %q: %s", name(field), value, fmt.Sprintf(format, args...)))
	}
	var c Config

	c.ProxyPort = parsePort(o.ProxyPort, "ProxyPort", bad)
	c.InboundCapturePort = parsePort(o.InboundCapturePort, "InboundCapturePort", bad)
	if c.ProxyPort != 0 && c.ProxyPort == c.InboundCapturePort {
		bad("InboundCapturePort", o.InboundCapturePort, "must differ from %s", name("ProxyPort"))
	}
	c.ProxyUIDs = parseIDs(o.ProxyUID, "ProxyUID", bad)
	c.ProxyGIDs = parseIDs(o.ProxyGID, "ProxyGID", bad)

	switch m := Mode(strings.ToUpper(strings.TrimSpace(o.InterceptionMode))); m {
	case ModeRedirect:
		c.Mode = m
	case ModeTProxy:
		bad("InterceptionMode", o.InterceptionMode, "TPROXY is recognised but not yet supported by meshlet; use REDIRECT")
	default:
		bad("InterceptionMode", o.InterceptionMode, "must be REDIRECT or TPROXY")
	}

	// Inbound.
	if strings.TrimSpace(o.InboundPorts) == "*" {
		c.InboundAll = true
	} else {
		c.InboundPorts = parsePorts(o.InboundPorts, "InboundPorts", bad)
	}
	c.InboundExclude = []uint16{TunnelPort}
	for _, p := range parsePorts(o.InboundPortsExclude, "InboundPortsExclude", bad) {
		if !slices.Contains(c.InboundExclude, p) {
			c.InboundExclude = append(c.InboundExclude, p)
		}
	}
	for _, p := range c.InboundPorts {
		switch {
		case p == TunnelPort:
			bad("InboundPorts", o.InboundPorts, "port %d is reserved (tunnel) and never captured", p)
		case slices.Contains(c.InboundExclude, p):
			bad("InboundPorts", o.InboundPorts, "port %d is also excluded by %s", p, name("InboundPortsExclude"))
		case p == c.ProxyPort || p == c.InboundCapturePort:
			bad("InboundPorts", o.InboundPorts, "port %d is a proxy capture port; capturing it would loop", p)
		}
	}

	// Outbound ranges.
	if strings.TrimSpace(o.OutboundIPRanges) == "*" {
		c.OutboundAll = true
	} else {
		c.OutboundRanges = parseCIDRs(o.OutboundIPRanges, "OutboundIPRanges", bad)
	}
	c.OutboundExclude = parseCIDRs(o.OutboundIPRangesExclude, "OutboundIPRangesExclude", bad)
	for _, p := range c.OutboundRanges {
		if slices.Contains(c.OutboundExclude, p) {
			bad("OutboundIPRanges", o.OutboundIPRanges, "range %s is also excluded by %s", p, name("OutboundIPRangesExclude"))
		}
	}

	// Outbound ports.
	c.OutboundPorts = parsePorts(o.OutboundPorts, "OutboundPorts", bad)
	c.OutboundPortsExclude = parsePorts(o.OutboundPortsExclude, "OutboundPortsExclude", bad)
	for _, p := range c.OutboundPorts {
		if slices.Contains(c.OutboundPortsExclude, p) {
			bad("OutboundPorts", o.OutboundPorts, "port %d is also excluded by %s", p, name("OutboundPortsExclude"))
		}
	}

	// Interfaces.
	for _, f := range splitList(o.ExcludeInterfaces) {
		if !ifaceRE.MatchString(f) {
			bad("ExcludeInterfaces", o.ExcludeInterfaces, "%q is not a valid interface name", f)
			continue
		}
		if f == "lo" {
			bad("ExcludeInterfaces", o.ExcludeInterfaces, "excluding lo would bypass the proxy's loopback rules")
			continue
		}
		if !slices.Contains(c.ExcludeInterfaces, f) {
			c.ExcludeInterfaces = append(c.ExcludeInterfaces, f)
		}
	}

	switch m := IPv6Mode(strings.ToLower(strings.TrimSpace(o.IPv6))); m {
	case "":
		c.IPv6 = IPv6Auto
	case IPv6Auto, IPv6On, IPv6Off:
		c.IPv6 = m
	case "true":
		c.IPv6 = IPv6On
	case "false":
		c.IPv6 = IPv6Off
	default:
		bad("IPv6", o.IPv6, "must be auto, on or off")
	}

	if len(errs) > 0 {
		return Config{}, fmt.Errorf("%w: %w", ErrInvalidOptions, errors.Join(errs...))
	}
	return c, nil
}

var ifaceRE = regexp.MustCompile(`^[A-Za-z0-9_.@:+-]{1,15}$`)

type badFunc func(field, value, format string, args ...any)

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

func parsePort(s, field string, bad badFunc) uint16 {
	p, err := strconv.ParseUint(strings.TrimSpace(s), 10, 16)
	if err != nil || p == 0 {
		bad(field, s, "must be a port number 1-65535")
		return 0
	}
	return uint16(p)
}

func parsePorts(s, field string, bad badFunc) []uint16 {
	var out []uint16
	for _, f := range splitList(s) {
		if f == "*" {
			bad(field, s, `"*" is not allowed here; list ports`)
			continue
		}
		p, err := strconv.ParseUint(f, 10, 16)
		if err != nil || p == 0 {
			bad(field, s, "%q is not a port number 1-65535", f)
			continue
		}
		if !slices.Contains(out, uint16(p)) {
			out = append(out, uint16(p))
		}
	}
	return out
}

func parseIDs(s, field string, bad badFunc) []uint32 {
	var out []uint32
	for _, f := range splitList(s) {
		id, err := strconv.ParseUint(f, 10, 32)
		if err != nil {
			bad(field, s, "%q is not a numeric ID", f)
			continue
		}
		if !slices.Contains(out, uint32(id)) {
			out = append(out, uint32(id))
		}
	}
	if len(out) == 0 && len(splitList(s)) == 0 {
		bad(field, s, "must not be empty")
	}
	return out
}

func parseCIDRs(s, field string, bad badFunc) []netip.Prefix {
	var out []netip.Prefix
	for _, f := range splitList(s) {
		if f == "*" {
			bad(field, s, `"*" is not allowed here; list CIDRs`)
			continue
		}
		var p netip.Prefix
		var err error
		if strings.Contains(f, "/") {
			p, err = netip.ParsePrefix(f)
		} else {
			var a netip.Addr
			a, err = netip.ParseAddr(f)
			if err == nil {
				p = netip.PrefixFrom(a, a.BitLen())
			}
		}
		if err != nil {
			bad(field, s, "%q is not an IP address or CIDR", f)
			continue
		}
		if p.Addr().Is4In6() {
			if p.Bits() < 96 {
				bad(field, s, "%q mixes an IPv4-mapped address with a prefix shorter than /96", f)
				continue
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		p = p.Masked()
		if !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}
