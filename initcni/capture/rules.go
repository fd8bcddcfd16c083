package capture

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// Family is an IP family: iptables (IPv4) or ip6tables (IPv6).
type Family int

// The two IP families.
const (
	IPv4 Family = 4
	IPv6 Family = 6
)

func (f Family) String() string {
	if f == IPv6 {
		return "ipv6"
	}
	return "ipv4"
}

func (f Family) loopback() netip.Prefix {
	if f == IPv6 {
		return netip.MustParsePrefix("::1/128")
	}
	return netip.MustParsePrefix("127.0.0.1/32")
}

// InboundPassthroughSource is the source address the proxy uses to forward
// inbound traffic to the app (127.0.0.6 or ::6); it is never captured again.
func (f Family) InboundPassthroughSource() netip.Prefix {
	if f == IPv6 {
		return netip.MustParsePrefix("::6/128")
	}
	return netip.MustParsePrefix("127.0.0.6/32")
}

// Table is the iptables table all capture rules live in.
const Table = "nat"

// Chains meshlet owns, in the order they are declared. They keep Istio's
// names so Istio tooling and habits carry over.
const (
	ChainInbound    = "ISTIO_INBOUND"
	ChainInRedirect = "ISTIO_IN_REDIRECT"
	ChainOutput     = "ISTIO_OUTPUT"
	ChainRedirect   = "ISTIO_REDIRECT"
)

// OwnChains lists the chains meshlet creates.
var OwnChains = []string{ChainInbound, ChainInRedirect, ChainOutput, ChainRedirect}

// CommentPrefix starts the owner comment every meshlet rule carries; cleanup
// and read-back recognise meshlet's rules in the built-in chains by it.
const CommentPrefix = "meshlet:"

// Owner is an `-m owner` match.
type Owner struct {
	GID    bool // --gid-owner instead of --uid-owner
	ID     uint32
	Negate bool
}

// Rule is one iptables rule in the nat table, as a typed value. Render
// prints its fields in the order iptables-save prints them, so the rendered
// text and the read-back text are identical.
type Rule struct {
	Chain    string
	Src      netip.Prefix // -s, when valid
	Dst      netip.Prefix // -d, when valid
	NotDst   bool         // ! -d
	InIface  string       // -i
	OutIface string       // -o
	TCP      bool         // -p tcp
	DPort    uint16       // -m tcp --dport (needs TCP)
	NotDPort bool         // ! --dport
	Owner    *Owner       // -m owner
	Comment  string       // -m comment --comment "meshlet: ..."
	Target   string       // -j
	ToPorts  uint16       // REDIRECT --to-ports
}

// String renders r as an iptables-save line ("-A CHAIN ...").
func (r Rule) String() string {
	var b strings.Builder
	b.WriteString("-A ")
	b.WriteString(r.Chain)
	if r.Src.IsValid() {
		fmt.Fprintf(&b, " -s %s", r.Src)
	}
	if r.Dst.IsValid() {
		if r.NotDst {
			b.WriteString(" !")
		}
		fmt.Fprintf(&b, " -d %s", r.Dst)
	}
	if r.InIface != "" {
		fmt.Fprintf(&b, " -i %s", r.InIface)
	}
	if r.OutIface != "" {
		fmt.Fprintf(&b, " -o %s", r.OutIface)
	}
	if r.TCP {
		b.WriteString(" -p tcp")
		if r.DPort != 0 {
			b.WriteString(" -m tcp")
			if r.NotDPort {
				b.WriteString(" !")
			}
			fmt.Fprintf(&b, " --dport %d", r.DPort)
		}
	}
	if o := r.Owner; o != nil {
		b.WriteString(" -m owner")
		if o.Negate {
			b.WriteString(" !")
		}
		if o.GID {
			fmt.Fprintf(&b, " --gid-owner %d", o.ID)
		} else {
			fmt.Fprintf(&b, " --uid-owner %d", o.ID)
		}
	}
	if r.Comment != "" {
		fmt.Fprintf(&b, " -m comment --comment %s", strconv.Quote(r.Comment))
	}
	fmt.Fprintf(&b, " -j %s", r.Target)
	if r.ToPorts != 0 {
		fmt.Fprintf(&b, " --to-ports %d", r.ToPorts)
	}
	return b.String()
}

// RuleSet is the complete set of meshlet rules for one IP family.
type RuleSet struct {
	Family Family
	// Chains are the chains meshlet declares (and flushes) on apply.
	Chains []string
	// Rules in order: first the jumps from the built-in chains, then the
	// contents of meshlet's chains.
	Rules []Rule
}

// Rules builds the rule model for family from a validated Config.
func Rules(c Config, f Family) RuleSet {
	rs := RuleSet{Family: f, Chains: OwnChains}
	add := func(r Rule) { rs.Rules = append(rs.Rules, r) }
	lo := f.loopback()
	inRedirect := Rule{Chain: ChainInRedirect, TCP: true, Target: "REDIRECT", ToPorts: c.InboundCapturePort,
		Comment: fmt.Sprintf("meshlet: redirect inbound to proxy port %d", c.InboundCapturePort)}
	redirect := Rule{Chain: ChainRedirect, TCP: true, Target: "REDIRECT", ToPorts: c.ProxyPort,
		Comment: fmt.Sprintf("meshlet: redirect outbound to proxy port %d", c.ProxyPort)}

	// Built-in chains.
	inbound := c.InboundAll || len(c.InboundPorts) > 0
	if inbound {
		add(Rule{Chain: "PREROUTING", TCP: true, Target: ChainInbound, Comment: "meshlet: inbound TCP capture"})
	}
	add(Rule{Chain: "OUTPUT", Target: ChainOutput, Comment: "meshlet: outbound capture"})

	// ISTIO_INBOUND.
	if inbound {
		for _, ifc := range c.ExcludeInterfaces {
			add(Rule{Chain: ChainInbound, InIface: ifc, Target: "RETURN", Comment: "meshlet: excluded interface " + ifc})
		}
		if c.InboundAll {
			for _, p := range c.InboundExclude {
				add(Rule{Chain: ChainInbound, TCP: true, DPort: p, Target: "RETURN",
					Comment: fmt.Sprintf("meshlet: inbound port %d not captured", p)})
			}
			add(Rule{Chain: ChainInbound, TCP: true, Target: ChainInRedirect, Comment: "meshlet: capture all other inbound ports"})
		} else {
			for _, p := range c.InboundPorts {
				add(Rule{Chain: ChainInbound, TCP: true, DPort: p, Target: ChainInRedirect,
					Comment: fmt.Sprintf("meshlet: capture inbound port %d", p)})
			}
		}
	}

	// ISTIO_IN_REDIRECT: always present, the loopback hairpin jumps to it.
	add(inRedirect)

	// ISTIO_OUTPUT.
	for _, ifc := range c.ExcludeInterfaces {
		add(Rule{Chain: ChainOutput, OutIface: ifc, Target: "RETURN", Comment: "meshlet: excluded interface " + ifc})
	}
	for _, p := range c.OutboundPortsExclude {
		add(Rule{Chain: ChainOutput, TCP: true, DPort: p, Target: "RETURN",
			Comment: fmt.Sprintf("meshlet: outbound port %d not captured", p)})
	}
	add(Rule{Chain: ChainOutput, Src: f.InboundPassthroughSource(), OutIface: "lo", Target: "RETURN",
		Comment: "meshlet: proxy inbound passthrough not recaptured"})
	owners := func(gid bool, ids []uint32) {
		kind := "UID"
		if gid {
			kind = "GID"
		}
		for _, id := range ids {
			add(Rule{Chain: ChainOutput, Dst: lo, NotDst: true, OutIface: "lo", TCP: true, DPort: TunnelPort, NotDPort: true,
				Owner: &Owner{GID: gid, ID: id}, Target: ChainInRedirect,
				Comment: fmt.Sprintf("meshlet: proxy %s %d to own pod IP goes inbound", kind, id)})
			add(Rule{Chain: ChainOutput, OutIface: "lo", Owner: &Owner{GID: gid, ID: id, Negate: true}, Target: "RETURN",
				Comment: fmt.Sprintf("meshlet: app loopback traffic not captured (%s)", kind)})
			add(Rule{Chain: ChainOutput, Owner: &Owner{GID: gid, ID: id}, Target: "RETURN",
				Comment: fmt.Sprintf("meshlet: proxy %s %d not captured", kind, id)})
		}
	}
	owners(false, c.ProxyUIDs)
	owners(true, c.ProxyGIDs)
	add(Rule{Chain: ChainOutput, Dst: lo, Target: "RETURN", Comment: "meshlet: localhost not captured"})
	// Excluded ranges before included ports, as istio-iptables orders them:
	// the exclusion wins.
	for _, p := range c.OutboundExclude {
		if p.Addr().Is4() != (f == IPv4) {
			continue
		}
		add(Rule{Chain: ChainOutput, Dst: p, Target: "RETURN", Comment: fmt.Sprintf("meshlet: outbound range %s not captured", p)})
	}
	for _, p := range c.OutboundPorts {
		add(Rule{Chain: ChainOutput, TCP: true, DPort: p, Target: ChainRedirect,
			Comment: fmt.Sprintf("meshlet: capture outbound port %d", p)})
	}
	if c.OutboundAll {
		add(Rule{Chain: ChainOutput, Target: ChainRedirect, Comment: "meshlet: capture all other outbound"})
	} else {
		for _, p := range c.OutboundRanges {
			if p.Addr().Is4() != (f == IPv4) {
				continue
			}
			add(Rule{Chain: ChainOutput, Dst: p, Target: ChainRedirect, Comment: fmt.Sprintf("meshlet: capture outbound range %s", p)})
		}
	}

	// ISTIO_REDIRECT.
	add(redirect)
	return rs
}

// Lines returns the rules as iptables-save lines, in order.
func (rs RuleSet) Lines() []string {
	out := make([]string, len(rs.Rules))
	for i, r := range rs.Rules {
		out[i] = r.String()
	}
	return out
}

// Render returns the iptables-restore input that installs rs. It is meant
// for `iptables-restore --noflush`: declaring meshlet's chains flushes them,
// so only the jumps in the built-in chains need removing first (see
// RenderApply).
func (rs RuleSet) Render() string { return rs.render(nil) }

func (rs RuleSet) render(deletes []string) string {
	var b strings.Builder
	b.WriteString("*nat\n")
	for _, ch := range rs.Chains {
		fmt.Fprintf(&b, ":%s - [0:0]\n", ch)
	}
	for _, d := range deletes {
		b.WriteString(d)
		b.WriteByte('\n')
	}
	for _, r := range rs.Rules {
		b.WriteString(r.String())
		b.WriteByte('\n')
	}
	b.WriteString("COMMIT\n")
	return b.String()
}
