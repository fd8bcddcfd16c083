package capture

import (
	"flag"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite golden files under testdata/")

// golden compares got with testdata/name, rewriting it under -update. A
// stale golden file fails the test.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading golden file (run with -update to create): %v", err)
	}
	if string(want) != got {
		t.Errorf("%s is stale (run go test -update to rewrite after checking the diff):\n--- want\n%s\n--- got\n%s", path, want, got)
	}
}

// goldenCases are the option sets rendered to testdata/render/NAME.golden.
var goldenCases = []struct {
	name string
	mod  func(*Options)
}{
	{"default", func(*Options) {}},
	{"injector-explicit", func(o *Options) {
		o.InboundPorts, o.InboundPortsExclude, o.OutboundIPRanges, o.OutboundIPRangesExclude = "*", "22,15090,15021,15020", "*", ""
	}},
	{"inbound-none", func(o *Options) { o.InboundPorts = "" }},
	{"inbound-list", func(o *Options) { o.InboundPorts = "8080,9090"; o.InboundPortsExclude = "" }},
	{"inbound-exclude-extra", func(o *Options) { o.InboundPortsExclude = "22,15090,15021,15020,3306" }},
	{"inbound-exclude-empty", func(o *Options) { o.InboundPortsExclude = "" }},
	{"outbound-none", func(o *Options) { o.OutboundIPRanges = "" }},
	{"outbound-list", func(o *Options) { o.OutboundIPRanges = "10.96.0.0/12,10.211.0.0/16" }},
	{"outbound-exclude", func(o *Options) { o.OutboundIPRangesExclude = "169.254.169.254/32,10.211.9.0/24" }},
	{"outbound-ports", func(o *Options) { o.OutboundIPRanges = ""; o.OutboundPorts = "443,8443" }},
	{"outbound-ports-exclude", func(o *Options) { o.OutboundPortsExclude = "5432,6379" }},
	{"exclude-interfaces", func(o *Options) { o.ExcludeInterfaces = "eth1,net2" }},
	{"custom-ports-uid", func(o *Options) {
		o.ProxyPort, o.InboundCapturePort, o.ProxyUID, o.ProxyGID = "16001", "16006", "2000", "2001"
	}},
	{"multiple-uids", func(o *Options) { o.ProxyUID = "1337,0"; o.ProxyGID = "1337" }},
	{"mixed-families", func(o *Options) {
		o.OutboundIPRanges = "10.96.0.0/12,fd00:96::/108"
		o.OutboundIPRangesExclude = "10.96.0.10,fd00:96::10"
	}},
	{"everything", func(o *Options) {
		o.InboundPorts = "80,443"
		o.InboundPortsExclude = "22"
		o.OutboundIPRanges = "10.0.0.0/8"
		o.OutboundIPRangesExclude = "10.1.0.0/16"
		o.OutboundPorts = "3306"
		o.OutboundPortsExclude = "25"
		o.ExcludeInterfaces = "eth9"
	}},
}

func TestRenderGolden(t *testing.T) {
	if len(goldenCases) < 15 {
		t.Fatalf("want at least 15 golden option sets, have %d", len(goldenCases))
	}
	for _, tc := range goldenCases {
		t.Run(tc.name, func(t *testing.T) {
			o := NewOptions()
			tc.mod(&o)
			c, err := BuildConfig(o)
			if err != nil {
				t.Fatal(err)
			}
			var b strings.Builder
			for _, f := range []Family{IPv4, IPv6} {
				b.WriteString("# " + f.String() + "\n")
				b.WriteString(Rules(c, f).Render())
			}
			golden(t, filepath.Join("render", tc.name+".golden"), b.String())
		})
	}
}

var commentRE = regexp.MustCompile(` -m comment --comment "[^"]*"`)

// StripComments removes the owner comments, leaving the rule as docs/design.md
// section 4 prints it.
func stripComments(lines []string) []string {
	out := make([]string, len(lines))
	for i, l := range lines {
		out[i] = commentRE.ReplaceAllString(l, "")
	}
	return out
}

// TestDefaultMatchesDesign checks the default IPv4 rules against docs/design.md
// section 4 rule for rule (testdata/design-section4.txt is that block,
// copied verbatim), and that every rule carries an owner comment.
func TestDefaultMatchesDesign(t *testing.T) {
	design, err := os.ReadFile("testdata/design-section4.txt")
	if err != nil {
		t.Fatal(err)
	}
	want := strings.Split(strings.TrimSpace(string(design)), "\n")
	c, err := BuildConfig(NewOptions())
	if err != nil {
		t.Fatal(err)
	}
	lines := Rules(c, IPv4).Lines()
	got := stripComments(lines)
	if d := Diff(want, got); d != "" {
		t.Fatalf("default rules differ from docs/design.md section 4:\n%s", d)
	}
	for _, l := range lines {
		if !strings.Contains(l, `--comment "`+CommentPrefix) {
			t.Errorf("rule without owner comment: %s", l)
		}
	}
	// IPv6: the same with ::1/128 and ::6/128.
	v6 := strings.Join(stripComments(Rules(c, IPv6).Lines()), "\n")
	v4as6 := strings.NewReplacer("127.0.0.1/32", "::1/128", "127.0.0.6/32", "::6/128").Replace(strings.Join(want, "\n"))
	if v6 != v4as6 {
		t.Fatalf("IPv6 default rules are not the IPv4 ones with ::1/::6:\n%s", Diff(strings.Split(v4as6, "\n"), strings.Split(v6, "\n")))
	}
}
