package capture

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

func TestBuildConfigRejects(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name string
		mod  func(*Options)
		want []string // every substring must appear in the error
	}{
		{"bad proxy port", func(o *Options) { o.ProxyPort = "0" }, []string{"--proxy-port (-p)", `"0"`}},
		{"port too big", func(o *Options) { o.InboundCapturePort = "70000" }, []string{"--inbound-capture-port (-z)", "70000"}},
		{"same ports", func(o *Options) { o.InboundCapturePort = "15001" }, []string{"must differ"}},
		{"uid not numeric", func(o *Options) { o.ProxyUID = "istio" }, []string{"--proxy-uid (-u)", "istio"}},
		{"gid empty", func(o *Options) { o.ProxyGID = "" }, []string{"--proxy-gid (-g)", "must not be empty"}},
		{"tproxy", func(o *Options) { o.InterceptionMode = "TPROXY" }, []string{"--interception-mode (-m)", "not yet supported"}},
		{"bad mode", func(o *Options) { o.InterceptionMode = "NONE" }, []string{"must be REDIRECT (TPROXY is recognised"}},
		{"inbound bad port", func(o *Options) { o.InboundPorts = "80,http" }, []string{"--inbound-ports (-b)", `"http"`}},
		{"exclude star", func(o *Options) { o.InboundPortsExclude = "*" }, []string{"--inbound-ports-exclude (-d)", `"*" is not allowed`}},
		{"bad cidr", func(o *Options) { o.OutboundIPRanges = "10.0.0.0/33" }, []string{"--outbound-ip-ranges (-i)", "10.0.0.0/33"}},
		{"bad exclude cidr", func(o *Options) { o.OutboundIPRangesExclude = "nope" }, []string{"--outbound-ip-ranges-exclude (-x)", "nope"}},
		{"bad outbound port exclude", func(o *Options) { o.OutboundPortsExclude = "-1" }, []string{"--outbound-ports-exclude (-o)"}},
		{"bad interface", func(o *Options) { o.ExcludeInterfaces = "eth 0" }, []string{"--exclude-interfaces (-c)", "not a valid interface"}},
		{"exclude lo", func(o *Options) { o.ExcludeInterfaces = "lo" }, []string{"--exclude-interfaces (-c)", `"lo"`, "lo cannot be excluded"}},
		{"mapped short prefix", func(o *Options) { o.OutboundIPRanges = "::ffff:10.0.0.0/64" }, []string{"IPv4-mapped"}},
		{"bad ipv6", func(o *Options) { o.IPv6 = "maybe" }, []string{"--ipv6", "maybe"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o := NewOptions()
			tc.mod(&o)
			_, err := BuildConfig(o)
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, ErrInvalidOptions) {
				t.Errorf("error does not wrap ErrInvalidOptions: %v", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

// TestBuildConfigExclusionWins: where an exclusion and an inclusion overlap,
// istio-iptables' rule order makes the exclusion win; BuildConfig accepts
// that, keeps the port or range uncaptured and says so in a warning naming
// the option and value.
func TestBuildConfigExclusionWins(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		mod     func(*Options)
		inbound []uint16 // InboundPorts after the build
		warn    []string
	}{
		{"inbound includes tunnel", func(o *Options) { o.InboundPorts = "15008,80"; o.InboundPortsExclude = "" }, []uint16{80},
			[]string{"--inbound-ports (-b)", `"15008,80"`, "15008 is reserved"}},
		{"inbound include and exclude", func(o *Options) { o.InboundPorts = "22,80" }, []uint16{80},
			[]string{"port 22 is also excluded by --inbound-ports-exclude (-d)"}},
		{"inbound includes health port", func(o *Options) { o.InboundPorts = "15021" }, nil,
			[]string{"port 15021 is the sidecar's own"}},
		{"inbound includes capture port", func(o *Options) { o.InboundPorts = "15006,15001"; o.InboundPortsExclude = "" }, nil,
			[]string{"port 15006 is a proxy capture port", "port 15001 is a proxy capture port"}},
		{"cidr inside excluded", func(o *Options) { o.OutboundIPRanges = "10.1.0.0/16"; o.OutboundIPRangesExclude = "10.0.0.0/8" }, nil,
			[]string{"--outbound-ip-ranges (-i)", "10.1.0.0/16 lies inside 10.0.0.0/8"}},
		{"outbound ports both", func(o *Options) { o.OutboundPorts = "443"; o.OutboundPortsExclude = "443" }, nil,
			[]string{"--outbound-ports (-q)", "port 443 is also excluded by --outbound-ports-exclude (-o)"}},
		{"lower-case mode", func(o *Options) { o.InterceptionMode = "redirect" }, nil,
			[]string{"--interception-mode (-m)", `"redirect"`, "read as REDIRECT"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o := NewOptions()
			tc.mod(&o)
			c, err := BuildConfig(o)
			if err != nil {
				t.Fatal(err)
			}
			if tc.inbound != nil || !c.InboundAll {
				if fmt.Sprint(c.InboundPorts) != fmt.Sprint(tc.inbound) {
					t.Errorf("InboundPorts = %v, want %v", c.InboundPorts, tc.inbound)
				}
			}
			var all []string
			for _, w := range c.Warnings {
				all = append(all, w.Error())
			}
			joined := strings.Join(all, "\n")
			for _, w := range tc.warn {
				if !strings.Contains(joined, w) {
					t.Errorf("warnings %q do not contain %q", joined, w)
				}
			}
			// The canonical options build the same rules, without warnings
			// about what was already resolved.
			again, err := BuildConfig(c.Options())
			if err != nil {
				t.Fatalf("canonical options %+v rejected: %v", c.Options(), err)
			}
			if d := Diff(Rules(c, IPv4).Lines(), Rules(again, IPv4).Lines()); d != "" {
				t.Errorf("canonical options change the rules:\n%s", d)
			}
		})
	}
}

func TestBuildConfigCollectsEveryProblem(t *testing.T) {
	t.Parallel()
	o := NewOptions()
	o.ProxyPort, o.ProxyUID, o.OutboundIPRanges, o.InterceptionMode = "x", "y", "z", "TPROXY"
	_, err := BuildConfig(o)
	if err == nil {
		t.Fatal("accepted")
	}
	for _, w := range []string{"-p", "-u", "-i", "-m"} {
		if !strings.Contains(err.Error(), "("+w+")") {
			t.Errorf("error does not name %s: %v", w, err)
		}
	}
	var fields []string
	for _, oe := range OptionErrors(err) {
		fields = append(fields, oe.Field)
	}
	if got := strings.Join(fields, ","); got != "ProxyPort,ProxyUID,InterceptionMode,OutboundIPRanges" {
		t.Errorf("OptionErrors fields = %s", got)
	}
}

func TestBuildConfigSemantics(t *testing.T) {
	t.Parallel()
	o := NewOptions()
	o.InboundPortsExclude = "22,15008,22"
	o.OutboundIPRanges = " 10.0.0.1 , fd00::/64 "
	c, err := BuildConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	if got := c.InboundExclude; len(got) != 2 || got[0] != 15008 || got[1] != 22 {
		t.Errorf("InboundExclude = %v, want [15008 22]", got)
	}
	if c.OutboundAll || len(c.OutboundRanges) != 2 || c.OutboundRanges[0].String() != "10.0.0.1/32" {
		t.Errorf("OutboundRanges = %v", c.OutboundRanges)
	}
	if !c.InboundAll || c.Mode != ModeRedirect || c.IPv6 != IPv6Auto {
		t.Errorf("defaults lost: %+v", c)
	}
	o.InterceptionMode = "redirect"
	if _, err := BuildConfig(o); err != nil {
		t.Errorf("lower-case redirect rejected: %v", err)
	}
}

func BenchmarkRenderDefault(b *testing.B) {
	c, err := BuildConfig(NewOptions())
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		_ = Rules(c, IPv4).Render()
	}
}
