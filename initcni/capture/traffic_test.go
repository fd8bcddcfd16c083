package capture_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/test/netlab"
)

// TestPrivilegedTraffic sends real TCP traffic through the rules: a client
// netns and a "pod" netns joined by veth, capture listeners on 15001/15006
// reporting SO_ORIGINAL_DST, app listeners, and dialers running as the proxy
// UID/GID and as an app UID. IPv4 and IPv6.
func TestPrivilegedTraffic(t *testing.T) {
	netlab.Require(t)
	for i, b := range []capture.Backend{capture.BackendNFT, capture.BackendLegacy} {
		t.Run(string(b), func(t *testing.T) {
			t.Parallel()
			traffic(t, b, i+1)
		})
	}
}

// traffic runs the traffic checks with backend b in subnet 10.211.N.0/24
// (and fd00:211:N::/64).
func traffic(t *testing.T, b capture.Backend, n int) {
	r := strings.NewReplacer("10.211.1.", fmt.Sprintf("10.211.%d.", n), "fd00:211:1::", fmt.Sprintf("fd00:211:%d::", n))
	client := netlab.NewNS(t, "mlcap-")
	pod := netlab.NewNS(t, "mlcap-")
	netlab.Veth(t, client, "c0", []string{r.Replace("10.211.1.1/24"), r.Replace("10.211.1.3/24"), r.Replace("fd00:211:1::1/64"), r.Replace("fd00:211:1::3/64")},
		pod, "eth0", []string{r.Replace("10.211.1.2/24"), r.Replace("fd00:211:1::2/64")})
	cfg := mustConfig(t, func(o *capture.Options) {
		o.OutboundIPRangesExclude = r.Replace("10.211.1.3/32,fd00:211:1::3/128")
		o.OutboundPortsExclude = "9001"
		// Included ports that an excluded range or port overrides: the
		// exclusion wins, as istio-iptables orders its rules.
		o.OutboundPorts = "9000,9001"
		o.IPv6 = "auto" // the pod has a global (ULA) IPv6 address: dual stack
	})
	res, err := capture.Apply(t.Context(), cfg, capture.Target{NetnsPath: pod.Path, Backend: b})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Families) != 2 {
		t.Fatalf("auto IPv6 did not apply both families: %v", res.Families)
	}

	// Pod: capture listeners and app listeners (wildcard, dual stack).
	listen(t, pod, ":15006", "inbound-capture", true)
	listen(t, pod, ":15001", "outbound-capture", true)
	for _, p := range []int{8080, 15008, 22, 15090, 15021, 15020} {
		listen(t, pod, fmt.Sprintf(":%d", p), fmt.Sprintf("app-%d", p), false)
	}
	// Client: an upstream on 9000 and 9001.
	for _, p := range []int{9000, 9001} {
		listen(t, client, fmt.Sprintf(":%d", p), fmt.Sprintf("upstream-%d", p), false)
	}

	const app, proxy = 1000, 1337
	for _, fam := range []struct {
		name                   string
		pod, client, excluded  string
		passthrough, localhost string
	}{
		{"ipv4", r.Replace("10.211.1.2"), r.Replace("10.211.1.1"), r.Replace("10.211.1.3"), "127.0.0.6", "127.0.0.1"},
		{"ipv6", r.Replace("[fd00:211:1::2]"), r.Replace("[fd00:211:1::1]"), r.Replace("[fd00:211:1::3]"), "::6", "[::1]"},
	} {
		t.Run(fam.name, func(t *testing.T) {
			type step struct {
				name      string
				from      *netlab.NS
				uid, gid  int
				src, addr string
				want      string
			}
			strip := func(s string) string { return strings.Trim(s, "[]") }
			steps := []step{
				{"inbound app port lands on 15006", client, -1, -1, "", fam.pod + ":8080",
					"inbound-capture orig=" + fam.pod + ":8080"},
				{"app outbound lands on 15001", pod, app, app, "", fam.client + ":9000",
					"outbound-capture orig=" + fam.client + ":9000"},
				{"proxy UID outbound goes straight out", pod, proxy, app, "", fam.client + ":9000", "upstream-9000"},
				{"proxy GID outbound goes straight out", pod, app, proxy, "", fam.client + ":9000", "upstream-9000"},
				{"passthrough source is not recaptured", pod, proxy, proxy, strip(fam.passthrough), fam.pod + ":8080", "app-8080"},
				{"proxy to own pod IP goes inbound", pod, proxy, proxy, "", fam.pod + ":8080",
					"inbound-capture orig=" + fam.pod + ":8080"},
				{"app to own pod IP over lo not captured", pod, app, app, "", fam.pod + ":8080", "app-8080"},
				{"app to localhost not captured", pod, app, app, "", fam.localhost + ":8080", "app-8080"},
				{"excluded CIDR bypasses (over an included port)", pod, app, app, "", fam.excluded + ":9000", "upstream-9000"},
				{"excluded outbound port bypasses (over an included port)", pod, app, app, "", fam.client + ":9001", "upstream-9001"},
			}
			for _, p := range []int{15008, 22, 15090, 15021, 15020} {
				steps = append(steps, step{fmt.Sprintf("inbound port %d reaches the port", p), client, -1, -1, "",
					fmt.Sprintf("%s:%d", fam.pod, p), fmt.Sprintf("app-%d", p)})
			}
			// Batch the steps per (netns, uid, gid): one dialer process each.
			type who struct {
				ns       *netlab.NS
				uid, gid int
			}
			groups := map[who][]int{}
			var order []who
			for i, s := range steps {
				k := who{s.from, s.uid, s.gid}
				if _, ok := groups[k]; !ok {
					order = append(order, k)
				}
				groups[k] = append(groups[k], i)
			}
			for _, k := range order {
				var dials []dial
				for _, i := range groups[k] {
					dials = append(dials, dial{steps[i].src, steps[i].addr})
				}
				got := dialAs(t, k.ns, k.uid, k.gid, dials)
				for j, i := range groups[k] {
					s := steps[i]
					if got[j] != s.want {
						t.Errorf("%s: dial %s (uid %d gid %d src %q from %s): got %q, want %q",
							s.name, s.addr, s.uid, s.gid, s.src, s.from.Name, got[j], s.want)
					}
				}
			}
		})
	}

	// Without rules the same app dial reaches the upstream directly: the
	// test above fails if capture is absent.
	if err := capture.Cleanup(t.Context(), capture.Target{NetnsPath: pod.Path, Backend: b}); err != nil {
		t.Fatal(err)
	}
	if got := dialAs(t, pod, app, app, []dial{{"", r.Replace("10.211.1.1:9000")}})[0]; got != "upstream-9000" {
		t.Errorf("after cleanup: got %q", got)
	}
	for _, f := range []capture.Family{capture.IPv4, capture.IPv6} {
		// natSave fails the test when iptables-save fails.
		if out := natSave(t, pod, b, f); strings.Contains(out, "meshlet") {
			t.Errorf("cleanup left %s rules: %s", f, out)
		}
	}
}
