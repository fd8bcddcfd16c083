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

	"github.com/meshlet/meshlet/internal/meshports"
)

// Default values of Options, matching the default rule set of
// docs/design.md.
var (
	DefaultProxyPort           = strconv.Itoa(meshports.Outbound)
	DefaultInboundCapturePort  = strconv.Itoa(meshports.Inbound)
	DefaultProxyUID            = "1337"
	DefaultProxyGID            = "1337"
	DefaultInboundPortsExclude = "22," + joinPorts(meshports.NeverCapturedInbound)
)

// Defaults of Options that are constants.
const (
	DefaultInterceptionMode = "REDIRECT"
	DefaultInboundPorts     = "*"
	DefaultOutboundIPRanges = "*"

	// TunnelPort is always excluded from inbound capture (and from the
	// loopback hairpin), whatever the options say.
	TunnelPort = meshports.Tunnel
	// ValidationPort is the port the capture validation probe dials.
	ValidationPort = meshports.ValidationProbe
)

// Mode is the inbound interception mode.
type Mode string

// Interception modes. Only ModeRedirect is implemented; ModeTProxy is
// recognised so it can be rejected with a clear message.
const (
	ModeRedirect Mode = "REDIRECT"
	ModeTProxy   Mode = "TPROXY"
	// ModeNone (Istio's interception mode NONE) means no capture at all:
	// the injector adds no istio-init and the CNI plugin leaves such a pod
	// alone. BuildConfig does not take it: there are no rules to build.
	ModeNone Mode = "NONE"
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

// NewOptions returns the default options: the default rule set of
// docs/design.md.
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

	// Warnings say what was accepted with an effect the user may not
	// expect (an inclusion an exclusion overrides, a lower-case mode). They
	// do not change the rules.
	Warnings []*OptionError
}

// Namer names an option in messages. The CLI names flags; the CNI plugin
// and the injector name pod annotations or their config keys.
type Namer func(field string) string

// FlagNamer names options by their `meshlet init` flag.
func FlagNamer(field string) string {
	if opt, ok := OptionByField(field); ok {
		return opt.Flag()
	}
	return field
}

// ErrInvalidOptions is wrapped by every BuildConfig error.
var ErrInvalidOptions = errors.New("invalid capture options")

// OptionError is one problem of one option value: an error when BuildConfig
// rejects the options, a warning (Config.Warnings) when it accepted them with
// an effect the user may not expect.
type OptionError struct {
	Field   string // the Options field
	Name    string // the field as the Namer named it (flag, annotation, key)
	Value   string // the whole value as given
	Problem string
}

func (e *OptionError) Error() string { return fmt.Sprintf("%s %q: %s", e.Name, e.Value, e.Problem) }

// OptionErrors returns every *OptionError err carries (BuildConfig joins
// them), in order.
func OptionErrors(err error) []*OptionError {
	var out []*OptionError
	var walk func(error)
	walk = func(e error) {
		if oe, ok := e.(*OptionError); ok { //nolint:errorlint // walking the tree by hand
			out = append(out, oe)
			return
		}
		switch u := e.(type) { //nolint:errorlint // walking the tree by hand
		case interface{ Unwrap() []error }:
			for _, c := range u.Unwrap() {
				walk(c)
			}
		case interface{ Unwrap() error }:
			if c := u.Unwrap(); c != nil {
				walk(c)
			}
		}
	}
	if err != nil {
		walk(err)
	}
	return out
}

// BuildConfig validates o and converts it into a Config, collecting every
// problem; each names the flag and the offending value.
func BuildConfig(o Options) (Config, error) { return BuildConfigNamed(o, FlagNamer) }

// BuildConfigNamed is BuildConfig with options named by name.
//
// It follows istio-iptables' meaning: where an exclusion and an inclusion
// overlap, the exclusion wins (the rules put the RETURN first), and an
// inbound port list naming a port that is never captured (-d's ports, 15008,
// the proxy's capture ports) leaves it uncaptured. Neither is an error; both
// are reported in Config.Warnings. Only what cannot work is rejected.
func BuildConfigNamed(o Options, name Namer) (Config, error) {
	return BuildConfigShowing(o, name, nil)
}

// BuildConfigShowing is BuildConfigNamed where messages show, for the fields
// in shown, that value instead of the option's (the CNI plugin shows an
// annotation as the pod carries it, not merged with the defaults it adds
// to).
func BuildConfigShowing(o Options, name Namer, shown map[string]string) (Config, error) {
	var errs []error
	var c Config
	// value is the value a message shows for field (looked up only when
	// there is something to say: the common, clean build allocates nothing
	// for messages).
	value := func(field string) string {
		if v, ok := shown[field]; ok {
			return v
		}
		if opt, ok := OptionByField(field); ok {
			return opt.Get(o)
		}
		return ""
	}
	bad := func(field, _, format string, args ...any) {
		errs = append(errs, &OptionError{Field: field, Name: name(field), Value: value(field), Problem: fmt.Sprintf(format, args...)})
	}
	warn := func(field, format string, args ...any) {
		c.Warnings = append(c.Warnings, &OptionError{Field: field, Name: name(field), Value: value(field), Problem: fmt.Sprintf(format, args...)})
	}

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
		if o.InterceptionMode != string(m) {
			warn("InterceptionMode", "read as %s", m)
		}
	case ModeTProxy:
		bad("InterceptionMode", o.InterceptionMode, "TPROXY is recognised but not yet supported by meshlet; use REDIRECT")
	default:
		bad("InterceptionMode", o.InterceptionMode, "must be REDIRECT (TPROXY is recognised but not yet supported)")
	}

	// Inbound. An included port that is also excluded stays uncaptured.
	c.InboundExclude = []uint16{TunnelPort}
	for _, p := range parsePorts(o.InboundPortsExclude, "InboundPortsExclude", bad) {
		if !slices.Contains(c.InboundExclude, p) {
			c.InboundExclude = append(c.InboundExclude, p)
		}
	}
	if strings.TrimSpace(o.InboundPorts) == "*" {
		c.InboundAll = true
	} else {
		for _, p := range parsePorts(o.InboundPorts, "InboundPorts", bad) {
			switch {
			case p == TunnelPort:
				warn("InboundPorts", "port %d is reserved (tunnel) and never captured", p)
			case slices.Contains(c.InboundExclude, p) && slices.Contains(meshports.NeverCapturedInbound, p):
				warn("InboundPorts", "port %d is the sidecar's own (health, status or metrics) and not captured", p)
			case slices.Contains(c.InboundExclude, p):
				warn("InboundPorts", "port %d is also excluded by %s, so it is not captured", p, name("InboundPortsExclude"))
			case p == c.ProxyPort || p == c.InboundCapturePort:
				warn("InboundPorts", "port %d is a proxy capture port and never captured (it would loop)", p)
			default:
				c.InboundPorts = append(c.InboundPorts, p)
			}
		}
	}

	// Outbound ranges: an excluded range wins over an included one and over
	// the included ports.
	if strings.TrimSpace(o.OutboundIPRanges) == "*" {
		c.OutboundAll = true
	} else {
		c.OutboundRanges = parseCIDRs(o.OutboundIPRanges, "OutboundIPRanges", bad)
	}
	c.OutboundExclude = parseCIDRs(o.OutboundIPRangesExclude, "OutboundIPRangesExclude", bad)
	for _, p := range c.OutboundRanges {
		for _, x := range c.OutboundExclude {
			if x.Addr().Is4() == p.Addr().Is4() && x.Bits() <= p.Bits() && x.Contains(p.Addr()) {
				warn("OutboundIPRanges", "range %s lies inside %s of %s, so it is not captured", p, x, name("OutboundIPRangesExclude"))
				break
			}
		}
	}

	// Outbound ports: an excluded port wins over an included one.
	c.OutboundPorts = parsePorts(o.OutboundPorts, "OutboundPorts", bad)
	c.OutboundPortsExclude = parsePorts(o.OutboundPortsExclude, "OutboundPortsExclude", bad)
	for _, p := range c.OutboundPorts {
		if slices.Contains(c.OutboundPortsExclude, p) {
			warn("OutboundPorts", "port %d is also excluded by %s, so it is not captured", p, name("OutboundPortsExclude"))
		}
	}

	// Interfaces.
	for _, f := range splitList(o.ExcludeInterfaces) {
		if !ifaceRE.MatchString(f) {
			bad("ExcludeInterfaces", o.ExcludeInterfaces, "%q is not a valid interface name", f)
			continue
		}
		if f == "lo" {
			// istio-iptables takes it (a RETURN for -o lo in nat OUTPUT),
			// which silently turns off the loopback rules: the proxy's
			// calls to its own pod no longer reach inbound handling, and
			// the CNI mode validation probe, which travels over lo, fails.
			bad("ExcludeInterfaces", o.ExcludeInterfaces, "lo cannot be excluded: the capture's loopback rules (the proxy's calls to its own pod, the CNI validation probe) depend on it")
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

// Options returns the canonical options that build c again (without its
// warnings): what the injector passes to `meshlet init`. TunnelPort, which
// BuildConfig always adds, is left out of InboundPortsExclude.
func (c Config) Options() Options {
	o := Options{
		ProxyPort:               strconv.Itoa(int(c.ProxyPort)),
		InboundCapturePort:      strconv.Itoa(int(c.InboundCapturePort)),
		ProxyUID:                joinIDs(c.ProxyUIDs),
		ProxyGID:                joinIDs(c.ProxyGIDs),
		InterceptionMode:        string(c.Mode),
		InboundPorts:            joinPorts(c.InboundPorts),
		InboundPortsExclude:     joinPorts(slices.DeleteFunc(slices.Clone(c.InboundExclude), func(p uint16) bool { return p == TunnelPort })),
		OutboundIPRanges:        joinPrefixes(c.OutboundRanges),
		OutboundIPRangesExclude: joinPrefixes(c.OutboundExclude),
		OutboundPorts:           joinPorts(c.OutboundPorts),
		OutboundPortsExclude:    joinPorts(c.OutboundPortsExclude),
		ExcludeInterfaces:       strings.Join(c.ExcludeInterfaces, ","),
		IPv6:                    string(c.IPv6),
	}
	if c.InboundAll {
		o.InboundPorts = "*"
	}
	if c.OutboundAll {
		o.OutboundIPRanges = "*"
	}
	return o
}

func joinPorts(ps []uint16) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = strconv.Itoa(int(p))
	}
	return strings.Join(s, ",")
}

func joinIDs(ids []uint32) string {
	s := make([]string, len(ids))
	for i, id := range ids {
		s[i] = strconv.FormatUint(uint64(id), 10)
	}
	return strings.Join(s, ",")
}

func joinPrefixes(ps []netip.Prefix) string {
	s := make([]string, len(ps))
	for i, p := range ps {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
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
