package capture_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/proxy/origdst"
	"github.com/meshlet/meshlet/test/netlab"
)

// TestMain doubles as the dialer child: with MLCAP_DIALS set
// ("src|addr;src|addr;…") the test binary dials each address in turn (from
// src if not empty), prints the first line each server sends (or
// "error: …") one per line, and exits. Tests start it inside a pod netns as
// a given UID/GID, because capture depends on the socket owner; one child
// per identity keeps process start-ups few.
func TestMain(m *testing.M) {
	if dials, ok := os.LookupEnv("MLCAP_DIALS"); ok {
		for _, d := range strings.Split(dials, ";") {
			src, addr, _ := strings.Cut(d, "|")
			fmt.Println(dialOnce(src, addr))
		}
		os.Exit(0)
	}
	code := m.Run()
	netlab.RemoveSelfCopy()
	os.Exit(code)
}

func dialOnce(src, addr string) string {
	d := net.Dialer{Timeout: 3 * time.Second}
	if src != "" {
		d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(src)}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return "error: " + err.Error()
	}
	defer c.Close()
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return "error: reading: " + err.Error()
	}
	return strings.TrimSpace(line)
}

// dial is one connection attempt of a batch.
type dial struct{ src, addr string }

// dialAs makes the dials from inside ns as uid/gid (in one child process;
// uid -1 dials in-process as root) and returns each server's first line.
func dialAs(t *testing.T, ns *netlab.NS, uid, gid int, dials []dial) []string {
	t.Helper()
	if uid < 0 && gid < 0 {
		var out []string
		for _, d := range dials {
			var got string
			_ = ns.Do(func() error { got = dialOnce(d.src, d.addr); return nil })
			out = append(out, got)
		}
		return out
	}
	var spec []string
	for _, d := range dials {
		spec = append(spec, d.src+"|"+d.addr)
	}
	cmd := exec.Command(netlab.SelfCopy(t))
	cmd.Env = []string{"MLCAP_DIALS=" + strings.Join(spec, ";")}
	out, err := ns.Run(cmd, uid, gid)
	if err != nil {
		t.Fatalf("dialer as %d/%d: %v", uid, gid, err)
	}
	lines := strings.Split(strings.TrimRight(string(out), "\n"), "\n")
	if len(lines) != len(dials) {
		t.Fatalf("dialer printed %d lines for %d dials: %s", len(lines), len(dials), out)
	}
	return lines
}

// serve accepts on l and answers every connection with one line: name, and
// for capture listeners the original destination.
func serve(t *testing.T, l net.Listener, name string, reportOrig bool) {
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			msg := name
			if reportOrig {
				od, err := origdst.Get(c.(*net.TCPConn))
				if err != nil {
					msg += " orig=none"
				} else {
					msg += " orig=" + od.String()
				}
			}
			fmt.Fprintln(c, msg)
			c.Close()
		}
	}()
}

func listen(t *testing.T, ns *netlab.NS, addr, name string, reportOrig bool) {
	t.Helper()
	l, err := ns.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen %s in %s: %v", addr, ns.Name, err)
	}
	serve(t, l, name, reportOrig)
}

func mustConfig(t testing.TB, mod func(*capture.Options)) capture.Config {
	t.Helper()
	o := capture.NewOptions()
	if mod != nil {
		mod(&o)
	}
	c, err := capture.BuildConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func goldenFile(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if os.Getenv("MLCAP_UPDATE") == "1" || updateFlag() {
		_ = os.MkdirAll(filepath.Dir(path), 0o755)
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
		t.Errorf("%s is stale (rerun with -update after checking):\n--- want\n%s--- got\n%s", path, want, got)
	}
}

func updateFlag() bool {
	f := capture.FlagLookup("update")
	return f != nil && f.Value.String() == "true"
}

// TestPrivilegedReadBackGolden applies rule sets with both backends in real
// namespaces and keeps what iptables-save prints in testdata/readback.
func TestPrivilegedReadBackGolden(t *testing.T) {
	netlab.Require(t)
	cases := map[string]func(*capture.Options){
		"default": func(o *capture.Options) { o.IPv6 = "on" },
		"everything": func(o *capture.Options) {
			o.IPv6 = "on"
			o.InboundPorts, o.InboundPortsExclude = "80,443", "22"
			o.OutboundIPRanges, o.OutboundIPRangesExclude = "10.0.0.0/8,fd00::/8", "10.1.0.0/16,fd00:1::/32"
			o.OutboundPorts, o.OutboundPortsExclude, o.ExcludeInterfaces = "3306", "25", "eth9"
		},
	}
	for _, b := range []capture.Backend{capture.BackendNFT, capture.BackendLegacy} {
		for name, mod := range cases {
			t.Run(string(b)+"-"+name, func(t *testing.T) {
				t.Parallel()
				ns := netlab.NewNS(t, "mlcap-")
				c := mustConfig(t, mod)
				tgt := capture.Target{NetnsPath: ns.Path, Backend: b}
				res, err := capture.Apply(t.Context(), c, tgt)
				if err != nil {
					t.Fatal(err)
				}
				if res.Backend != b || len(res.Families) != 2 {
					t.Fatalf("result %+v", res)
				}
				var sb strings.Builder
				for _, f := range []capture.Family{capture.IPv4, capture.IPv6} {
					lines, err := capture.ReadBack(t.Context(), tgt, b, f)
					if err != nil {
						t.Fatal(err)
					}
					if d := capture.Diff(capture.Rules(c, f).Lines(), lines); d != "" {
						t.Errorf("%s read back differs from rendered:\n%s", f, d)
					}
					fmt.Fprintf(&sb, "# %s-save -t nat (%s), meshlet rules\n", map[capture.Family]string{capture.IPv4: "iptables", capture.IPv6: "ip6tables"}[f], b)
					sb.WriteString(strings.Join(lines, "\n") + "\n")
					if name == "default" && f == capture.IPv4 {
						design, err := os.ReadFile("testdata/design-section4.txt")
						if err != nil {
							t.Fatal(err)
						}
						stripped := regexp.MustCompile(` -m comment --comment "[^"]*"`).ReplaceAllString(strings.Join(lines, "\n"), "")
						if stripped != strings.TrimSpace(string(design)) {
							t.Errorf("%s read back (comments stripped) differs from docs/design.md section 4:\n%s", b, stripped)
						}
					}
				}
				goldenFile(t, filepath.Join("readback", string(b)+"-"+name+".golden"), sb.String())
			})
		}
	}
}

func natSave(t *testing.T, ns *netlab.NS, b capture.Backend, f capture.Family) string {
	t.Helper()
	tool := "iptables"
	if f == capture.IPv6 {
		tool = "ip6tables"
	}
	out, err := ns.Run(exec.Command(tool+"-"+string(b)+"-save", "-t", "nat"), -1, -1)
	if err != nil {
		t.Fatal(err)
	}
	var keep []string
	for _, l := range strings.Split(string(out), "\n") {
		if l != "" && l[0] != '#' {
			keep = append(keep, l)
		}
	}
	return strings.Join(keep, "\n")
}

func restoreIn(t *testing.T, ns *netlab.NS, b capture.Backend, input string) {
	t.Helper()
	cmd := exec.Command("iptables-"+string(b)+"-restore", "--noflush")
	cmd.Stdin = strings.NewReader(input)
	if out, err := ns.Run(cmd, -1, -1); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
}

// TestPrivilegedIdempotent: apply twice, apply over a partial/foreign rule
// set, switch configs, clean up twice; for both backends.
func TestPrivilegedIdempotent(t *testing.T) {
	netlab.Require(t)
	for _, b := range []capture.Backend{capture.BackendNFT, capture.BackendLegacy} {
		t.Run(string(b), func(t *testing.T) {
			t.Parallel()
			ctx := t.Context()
			ns := netlab.NewNS(t, "mlcap-")
			// A partial, uncommented Istio-style leftover plus a foreign rule.
			restoreIn(t, ns, b, "*nat\n:ISTIO_INBOUND - [0:0]\n:ISTIO_FOO - [0:0]\n"+
				"-A PREROUTING -p tcp -j ISTIO_INBOUND\n"+
				"-A ISTIO_INBOUND -p tcp -m tcp --dport 9999 -j RETURN\n"+
				"-A OUTPUT -d 10.211.9.9/32 -j RETURN\nCOMMIT\n")
			def := mustConfig(t, nil)
			tgt := capture.Target{NetnsPath: ns.Path, Backend: b}
			if _, err := capture.Apply(ctx, def, tgt); err != nil {
				t.Fatalf("apply over partial rules: %v", err)
			}
			first := natSave(t, ns, b, capture.IPv4)
			if !strings.Contains(first, "-A OUTPUT -d 10.211.9.9/32 -j RETURN") || !strings.Contains(first, ":ISTIO_FOO") {
				t.Errorf("foreign rules were touched:\n%s", first)
			}
			if strings.Contains(first, "9999") || strings.Count(first, "-j ISTIO_INBOUND") != 1 {
				t.Errorf("leftover rules survived:\n%s", first)
			}
			if _, err := capture.Apply(ctx, def, tgt); err != nil {
				t.Fatalf("second apply: %v", err)
			}
			if second := natSave(t, ns, b, capture.IPv4); second != first {
				t.Errorf("second apply changed the table:\n%s\nvs\n%s", first, second)
			}
			other := mustConfig(t, func(o *capture.Options) { o.InboundPorts = ""; o.OutboundIPRanges = "10.0.0.0/8" })
			if _, err := capture.Apply(ctx, other, tgt); err != nil {
				t.Fatalf("apply other config: %v", err)
			}
			if err := capture.Check(ctx, def, tgt); !errors.Is(err, capture.ErrMismatch) {
				t.Errorf("Check of the default config against other rules: %v, want ErrMismatch", err)
			}
			if _, err := capture.Apply(ctx, def, tgt); err != nil {
				t.Fatal(err)
			}
			if again := natSave(t, ns, b, capture.IPv4); again != first {
				t.Errorf("switching back did not converge:\n%s\nvs\n%s", first, again)
			}
			if err := capture.Check(ctx, def, tgt); err != nil {
				t.Errorf("Check: %v", err)
			}
			for i := range 2 {
				if err := capture.Cleanup(ctx, tgt); err != nil {
					t.Fatalf("cleanup %d: %v", i+1, err)
				}
			}
			after := natSave(t, ns, b, capture.IPv4)
			if strings.Contains(after, "ISTIO_INBOUND") || strings.Contains(after, "meshlet") {
				t.Errorf("cleanup left rules:\n%s", after)
			}
			if !strings.Contains(after, "-A OUTPUT -d 10.211.9.9/32 -j RETURN") || !strings.Contains(after, ":ISTIO_FOO") {
				t.Errorf("cleanup removed foreign rules:\n%s", after)
			}
		})
	}
}

func TestPrivilegedParallelApplies(t *testing.T) {
	netlab.Require(t)
	for _, b := range []capture.Backend{capture.BackendNFT, capture.BackendLegacy} {
		t.Run(string(b), func(t *testing.T) { parallelApplies(t, b) })
	}
}

func parallelApplies(t *testing.T, b capture.Backend) {
	c := mustConfig(t, nil)
	var nss []*netlab.NS
	for range 6 {
		nss = append(nss, netlab.NewNS(t, "mlcap-"))
	}
	var wg sync.WaitGroup
	errs := make(chan error, len(nss))
	for _, ns := range nss {
		wg.Add(1)
		go func() {
			defer wg.Done()
			_, err := capture.Apply(context.Background(), c, capture.Target{NetnsPath: ns.Path, Backend: b})
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	for _, ns := range nss {
		if err := capture.Check(t.Context(), c, capture.Target{NetnsPath: ns.Path, Backend: b}); err != nil {
			t.Error(err)
		}
	}
	// The host namespace is untouched. A failing iptables-save fails the
	// test: its empty output must not pass as "no rules".
	cmd := exec.Command("iptables-"+string(b)+"-save", "-t", "nat")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("reading the host namespace's rules: %s: %v: %s", cmd, err, out)
	}
	if strings.Contains(string(out), "meshlet:") {
		t.Errorf("host namespace got meshlet rules:\n%s", out)
	}
}

func TestPrivilegedBackendProbe(t *testing.T) {
	netlab.Require(t)
	t.Parallel()
	c := mustConfig(t, nil)
	fresh := netlab.NewNS(t, "mlcap-")
	res, err := capture.Apply(t.Context(), c, capture.Target{NetnsPath: fresh.Path})
	if err != nil {
		t.Fatal(err)
	}
	if res.Backend != capture.BackendNFT {
		t.Errorf("fresh netns: backend %s (%s), want nft", res.Backend, res.Reason)
	}
	legacy := netlab.NewNS(t, "mlcap-")
	restoreIn(t, legacy, capture.BackendLegacy, "*nat\n-A POSTROUTING -s 10.211.0.0/16 -j MASQUERADE\nCOMMIT\n")
	res, err = capture.Apply(t.Context(), c, capture.Target{NetnsPath: legacy.Path})
	if err != nil {
		t.Fatal(err)
	}
	if res.Backend != capture.BackendLegacy {
		t.Errorf("netns with legacy rules: backend %s (%s), want legacy", res.Backend, res.Reason)
	}
	// Forcing nft moves meshlet's rules out of legacy: never both.
	if _, err := capture.Apply(t.Context(), c, capture.Target{NetnsPath: legacy.Path, Backend: capture.BackendNFT}); err != nil {
		t.Fatal(err)
	}
	if lines, _ := capture.ReadBack(t.Context(), capture.Target{NetnsPath: legacy.Path}, capture.BackendLegacy, capture.IPv4); len(lines) != 0 {
		t.Errorf("forced nft apply left legacy rules: %v", lines)
	}
	if save := natSave(t, legacy, capture.BackendLegacy, capture.IPv4); !strings.Contains(save, "MASQUERADE") {
		t.Errorf("foreign legacy rule removed: %s", save)
	}
	if _, err := capture.Apply(t.Context(), c, capture.Target{NetnsPath: legacy.Path, Backend: capture.BackendLegacy}); err != nil {
		t.Fatal(err)
	}
	if lines, _ := capture.ReadBack(t.Context(), capture.Target{NetnsPath: legacy.Path}, capture.BackendNFT, capture.IPv4); len(lines) != 0 {
		t.Errorf("forced legacy apply left nft rules: %v", lines)
	}
	// Re-applying finds meshlet's own rules in legacy and stays there.
	res, err = capture.Apply(t.Context(), c, capture.Target{NetnsPath: legacy.Path})
	if err != nil || res.Backend != capture.BackendLegacy || !strings.Contains(res.Reason, "meshlet") {
		t.Errorf("re-apply: %v backend %s (%s)", err, res.Backend, res.Reason)
	}
}

// BenchmarkPrivilegedApplyDefault measures applying the default rule set
// (IPv4, backend probed) in a fresh network namespace: probe, one restore,
// read-back. Namespace creation is not timed.
func BenchmarkPrivilegedApplyDefault(b *testing.B) {
	netlab.Require(b)
	c := mustConfig(b, nil)
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		ns, err := netlab.Create("mlcap-")
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		_, err = capture.Apply(context.Background(), c, capture.Target{NetnsPath: ns.Path})
		b.StopTimer()
		if derr := ns.Delete(); derr != nil {
			b.Fatal(derr)
		}
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}

// BenchmarkPrivilegedRestoreOnlyBaseline is the floor for
// BenchmarkPrivilegedApplyDefault: the same default rules fed to one
// `iptables-nft-restore --noflush` run inside a fresh namespace,
// with no probe and no read-back.
func BenchmarkPrivilegedRestoreOnlyBaseline(b *testing.B) {
	netlab.Require(b)
	input := capture.Rules(mustConfig(b, nil), capture.IPv4).Render()
	b.ReportAllocs()
	for b.Loop() {
		b.StopTimer()
		ns, err := netlab.Create("mlcap-")
		if err != nil {
			b.Fatal(err)
		}
		cmd := exec.Command("iptables-nft-restore", "--noflush")
		cmd.Stdin = strings.NewReader(input)
		b.StartTimer()
		err = ns.Do(cmd.Run)
		b.StopTimer()
		if derr := ns.Delete(); derr != nil {
			b.Fatal(derr)
		}
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
}
