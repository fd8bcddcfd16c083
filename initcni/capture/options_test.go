package capture

import (
	"errors"
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
		{"bad mode", func(o *Options) { o.InterceptionMode = "NONE" }, []string{"must be REDIRECT or TPROXY"}},
		{"inbound bad port", func(o *Options) { o.InboundPorts = "80,http" }, []string{"--inbound-ports (-b)", `"http"`}},
		{"inbound includes tunnel", func(o *Options) { o.InboundPorts = "15008"; o.InboundPortsExclude = "" }, []string{"15008 is reserved"}},
		{"inbound include and exclude", func(o *Options) { o.InboundPorts = "22,80" }, []string{"port 22 is also excluded", "--inbound-ports-exclude (-d)"}},
		{"inbound includes capture port", func(o *Options) { o.InboundPorts = "15006"; o.InboundPortsExclude = "" }, []string{"would loop"}},
		{"exclude star", func(o *Options) { o.InboundPortsExclude = "*" }, []string{"--inbound-ports-exclude (-d)", `"*" is not allowed`}},
		{"bad cidr", func(o *Options) { o.OutboundIPRanges = "10.0.0.0/33" }, []string{"--outbound-ip-ranges (-i)", "10.0.0.0/33"}},
		{"bad exclude cidr", func(o *Options) { o.OutboundIPRangesExclude = "nope" }, []string{"--outbound-ip-ranges-exclude (-x)", "nope"}},
		{"cidr both", func(o *Options) { o.OutboundIPRanges = "10.0.0.0/8"; o.OutboundIPRangesExclude = "10.0.0.0/8" }, []string{"also excluded"}},
		{"outbound ports both", func(o *Options) { o.OutboundPorts = "443"; o.OutboundPortsExclude = "443" }, []string{"--outbound-ports (-q)", "443"}},
		{"bad outbound port exclude", func(o *Options) { o.OutboundPortsExclude = "-1" }, []string{"--outbound-ports-exclude (-o)"}},
		{"bad interface", func(o *Options) { o.ExcludeInterfaces = "eth 0" }, []string{"--exclude-interfaces (-c)", "not a valid interface"}},
		{"exclude lo", func(o *Options) { o.ExcludeInterfaces = "lo" }, []string{"excluding lo"}},
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
