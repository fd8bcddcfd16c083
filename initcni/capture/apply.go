package capture

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"slices"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Backend is the iptables userspace flavour.
type Backend string

// Backends. BackendAuto probes the target namespace.
const (
	BackendAuto   Backend = "auto"
	BackendNFT    Backend = "nft"
	BackendLegacy Backend = "legacy"
)

// ParseBackend parses auto|nft|legacy.
func ParseBackend(s string) (Backend, error) {
	switch b := Backend(strings.ToLower(strings.TrimSpace(s))); b {
	case "", BackendAuto:
		return BackendAuto, nil
	case BackendNFT, BackendLegacy:
		return b, nil
	}
	return "", fmt.Errorf("--iptables-backend %q: must be auto, nft or legacy", s)
}

// Target says where rules are applied.
type Target struct {
	// NetnsPath is the network namespace file (for example
	// /var/run/netns/x or /proc/PID/ns/net); empty means the current one.
	NetnsPath string
	// Backend forces nft or legacy; auto (or empty) probes.
	Backend Backend
	// Logger receives the backend choice and what was done; nil discards.
	Logger *slog.Logger
}

func (t Target) log() *slog.Logger {
	if t.Logger == nil {
		return slog.New(slog.DiscardHandler)
	}
	return t.Logger
}

// Result describes an apply.
type Result struct {
	Backend  Backend
	Reason   string // why this backend was chosen
	Families []Family
	Rules    map[Family]RuleSet
}

// ErrMismatch is wrapped when the rules read back differ from the intended ones.
var ErrMismatch = errors.New("capture rules read back differ from the intended rules")

// RunError is an external command that failed: its command line and output.
type RunError struct {
	Cmd    string
	Output string
	Err    error
}

func (e *RunError) Error() string {
	return fmt.Sprintf("running %s: %v: %s", e.Cmd, e.Err, strings.TrimSpace(e.Output))
}

func (e *RunError) Unwrap() error { return e.Err }

// tool returns the binary name for a backend, family and verb (save/restore).
func tool(b Backend, f Family, verb string) string {
	base := "iptables"
	if f == IPv6 {
		base = "ip6tables"
	}
	name := fmt.Sprintf("%s-%s-%s", base, b, verb)
	if _, err := exec.LookPath(name); err != nil {
		return base + "-" + verb
	}
	return name
}

func run(ctx context.Context, stdin string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	var out, errb bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = &errb
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	if err := cmd.Run(); err != nil {
		return out.String(), &RunError{Cmd: cmd.String(), Output: errb.String() + out.String(), Err: err}
	}
	return out.String(), nil
}

func save(ctx context.Context, b Backend, f Family) (string, error) {
	return run(ctx, "", tool(b, f, "save"), "-t", Table)
}

func restore(ctx context.Context, b Backend, f Family, input string) error {
	// --wait: the legacy backend serialises on one host-wide xtables lock,
	// so parallel applies in different namespaces must queue, not fail.
	_, err := run(ctx, input, tool(b, f, "restore"), "--noflush", "--wait", "10")
	if err != nil {
		return fmt.Errorf("%w\ninput:\n%s", err, input)
	}
	return nil
}

// natState is the nat table as iptables-save printed it.
type natState struct {
	chains []string // user chains declared
	rules  []string // "-A ..." lines
}

func parseSave(out string) natState {
	var s natState
	in := false
	for _, l := range strings.Split(out, "\n") {
		l = strings.TrimSpace(l)
		switch {
		case l == "*nat":
			in = true
		case l == "COMMIT":
			in = false
		case !in || l == "" || l[0] == '#':
		case l[0] == ':':
			name, _, _ := strings.Cut(l[1:], " ")
			if !slices.Contains([]string{"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"}, name) {
				s.chains = append(s.chains, name)
			}
		case strings.HasPrefix(l, "-A "):
			s.rules = append(s.rules, l)
		}
	}
	return s
}

func ruleChain(line string) string {
	f := strings.Fields(line)
	if len(f) < 2 {
		return ""
	}
	return f[1]
}

func ruleTarget(line string) string {
	f := strings.Fields(line)
	for i := 0; i+1 < len(f); i++ {
		if f[i] == "-j" || f[i] == "-g" {
			return f[i+1]
		}
	}
	return ""
}

// ours reports whether a rule belongs to meshlet: it lives in one of
// meshlet's chains, carries meshlet's owner comment, or jumps to one of
// meshlet's chains (a leftover of an earlier, uncommented istio-init).
func ours(line string) bool {
	return slices.Contains(OwnChains, ruleChain(line)) ||
		strings.Contains(line, `--comment "`+CommentPrefix) ||
		strings.Contains(line, "--comment "+CommentPrefix) ||
		slices.Contains(OwnChains, ruleTarget(line))
}

// ownRules returns meshlet's rules from a save, in save order.
func (s natState) ownRules() []string {
	var out []string
	for _, r := range s.rules {
		if ours(r) {
			out = append(out, r)
		}
	}
	return out
}

// deletesOutsideOwnChains returns `-D` lines for meshlet's rules that live
// outside meshlet's chains (declaring meshlet's chains flushes the rest).
func (s natState) deletesOutsideOwnChains() []string {
	var out []string
	for _, r := range s.rules {
		if ours(r) && !slices.Contains(OwnChains, ruleChain(r)) {
			out = append(out, "-D"+r[2:])
		}
	}
	return out
}

// Diff compares the intended lines with the read-back lines and describes
// the difference, or returns "" when they are equal.
func Diff(want, got []string) string {
	if slices.Equal(want, got) {
		return ""
	}
	var b strings.Builder
	for _, w := range want {
		if !slices.Contains(got, w) {
			fmt.Fprintf(&b, "missing:    %s\n", w)
		}
	}
	for _, g := range got {
		if !slices.Contains(want, g) {
			fmt.Fprintf(&b, "unexpected: %s\n", g)
		}
	}
	if b.Len() == 0 {
		b.WriteString("same rules in a different order:\n")
		for i := range max(len(want), len(got)) {
			var w, g string
			if i < len(want) {
				w = want[i]
			}
			if i < len(got) {
				g = got[i]
			}
			mark := " "
			if w != g {
				mark = "!"
			}
			fmt.Fprintf(&b, "%s want %s\n%s got  %s\n", mark, w, mark, g)
		}
	}
	return b.String()
}

// chooseBackend probes the nat table of both backends (in the current
// namespace) and picks one: the one holding meshlet's rules, else the one
// holding more rules, else nft when it works.
func chooseBackend(ctx context.Context, forced Backend) (Backend, string, map[Backend]natState) {
	states := map[Backend]natState{}
	if forced == BackendNFT || forced == BackendLegacy {
		return forced, "forced by --iptables-backend", states
	}
	nftOut, nftErr := save(ctx, BackendNFT, IPv4)
	// A legacy nat table exists in this namespace only if the kernel lists
	// it; reading that is far cheaper than iptables-legacy-save and does not
	// create an empty legacy table as a side effect.
	legOut, legErr := "", error(nil)
	if legacyTablePresent(IPv4) {
		legOut, legErr = save(ctx, BackendLegacy, IPv4)
	}
	if nftErr == nil {
		states[BackendNFT] = parseSave(nftOut)
	}
	if legErr == nil {
		states[BackendLegacy] = parseSave(legOut)
	}
	nft, leg := states[BackendNFT], states[BackendLegacy]
	switch {
	case nftErr != nil && legErr != nil:
		return BackendNFT, fmt.Sprintf("neither backend could be probed (nft: %v; legacy: %v)", nftErr, legErr), states
	case nftErr != nil:
		return BackendLegacy, fmt.Sprintf("nft not usable: %v", nftErr), states
	case len(nft.ownRules()) > 0 && len(leg.ownRules()) == 0:
		return BackendNFT, "nft nat table holds meshlet rules", states
	case len(leg.ownRules()) > 0 && len(nft.ownRules()) == 0:
		return BackendLegacy, "legacy nat table holds meshlet rules", states
	case legErr == nil && len(leg.rules) > len(nft.rules):
		return BackendLegacy, fmt.Sprintf("legacy nat table holds more rules (%d vs %d)", len(leg.rules), len(nft.rules)), states
	case len(nft.rules) > 0:
		return BackendNFT, fmt.Sprintf("nft nat table holds rules (%d vs %d legacy)", len(nft.rules), len(leg.rules)), states
	default:
		return BackendNFT, "no rules in either backend; nft preferred", states
	}
}

// legacyTablePresent reports whether the current thread's network namespace
// has a legacy (x_tables) nat table for family f.
func legacyTablePresent(f Family) bool {
	name := "ip_tables_names"
	if f == IPv6 {
		name = "ip6_tables_names"
	}
	b, err := os.ReadFile("/proc/thread-self/net/" + name)
	if err != nil {
		return false
	}
	return slices.Contains(strings.Fields(string(b)), Table)
}

// GlobalIPv6 returns the first global IPv6 address on a non-loopback
// interface of the current network namespace (of the calling thread's, when
// run inside InNetns). IPv6 capture in auto mode, and the validation probe,
// depend on it.
func GlobalIPv6() (netip.Addr, bool) {
	ifs, err := net.Interfaces()
	if err != nil {
		return netip.Addr{}, false
	}
	for _, ifc := range ifs {
		if ifc.Flags&net.FlagLoopback != 0 {
			continue
		}
		addrs, _ := ifc.Addrs()
		for _, a := range addrs {
			if ipn, ok := a.(*net.IPNet); ok && ipn.IP.To4() == nil && ipn.IP.IsGlobalUnicast() {
				if ad, ok := netip.AddrFromSlice(ipn.IP); ok {
					return ad, true
				}
			}
		}
	}
	return netip.Addr{}, false
}

func families(c Config) ([]Family, string) {
	switch c.IPv6 {
	case IPv6On:
		return []Family{IPv4, IPv6}, "ipv6 on"
	case IPv6Off:
		return []Family{IPv4}, "ipv6 off"
	}
	if _, ok := GlobalIPv6(); ok {
		return []Family{IPv4, IPv6}, "pod has a global IPv6 address"
	}
	return []Family{IPv4}, "no global IPv6 address"
}

// Apply installs the rules for c in the target namespace: per family one
// atomic iptables-restore that removes meshlet's previous jumps, (re)declares
// and fills meshlet's chains; then it reads the table back and fails with
// ErrMismatch and the difference when it is not what was meant. Running it
// again converges to the same state.
func Apply(ctx context.Context, c Config, t Target) (Result, error) {
	var res Result
	err := InNetns(t.NetnsPath, func() error {
		var states map[Backend]natState
		res.Backend, res.Reason, states = chooseBackend(ctx, t.Backend)
		log := t.log()
		fams, why := families(c)
		log.Info("iptables backend chosen", "backend", res.Backend, "reason", res.Reason, "netns", nsName(t.NetnsPath), "families", fmt.Sprint(fams), "familiesReason", why)
		res.Families = fams
		res.Rules = map[Family]RuleSet{}
		// Rules of ours in the other backend would capture a second time:
		// remove them first (a forced backend switch, or a half-migrated node).
		other := BackendLegacy
		if res.Backend == BackendLegacy {
			other = BackendNFT
		}
		if st, probed := states[other]; !probed || len(st.ownRules()) > 0 {
			if err := cleanBackend(ctx, other, log); err != nil {
				return err
			}
		}
		for _, f := range fams {
			rs := Rules(c, f)
			res.Rules[f] = rs
			before, ok := states[res.Backend]
			if f != IPv4 || !ok {
				out, err := save(ctx, res.Backend, f)
				if err != nil {
					return err
				}
				before = parseSave(out)
			}
			input := rs.render(before.deletesOutsideOwnChains())
			if err := restore(ctx, res.Backend, f, input); err != nil {
				return fmt.Errorf("applying %s capture rules: %w", f, err)
			}
			if err := check(ctx, res.Backend, rs); err != nil {
				return err
			}
			if f == IPv6 {
				if err := ensurePassthroughAddr(); err != nil {
					return err
				}
			}
			log.Info("capture rules applied", "family", f.String(), "rules", len(rs.Rules))
		}
		return nil
	})
	if err != nil {
		return res, fmt.Errorf("applying capture rules in %s: %w", nsName(t.NetnsPath), err)
	}
	return res, nil
}

func check(ctx context.Context, b Backend, rs RuleSet) error {
	out, err := save(ctx, b, rs.Family)
	if err != nil {
		return fmt.Errorf("reading back %s rules: %w", rs.Family, err)
	}
	if d := Diff(rs.Lines(), parseSave(out).ownRules()); d != "" {
		return fmt.Errorf("%w (%s, %s backend):\n%s", ErrMismatch, rs.Family, b, d)
	}
	return nil
}

// Check compares the live rules in the target namespace with the rules c
// means, without changing anything. It returns ErrMismatch with the
// difference when they differ.
func Check(ctx context.Context, c Config, t Target) error {
	err := InNetns(t.NetnsPath, func() error {
		b, _, _ := chooseBackend(ctx, t.Backend)
		fams, _ := families(c)
		for _, f := range fams {
			if err := check(ctx, b, Rules(c, f)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("checking capture rules in %s: %w", nsName(t.NetnsPath), err)
	}
	return nil
}

// ReadBack returns meshlet's rules as the given backend's iptables-save
// prints them for family f in the target namespace.
func ReadBack(ctx context.Context, t Target, b Backend, f Family) ([]string, error) {
	var lines []string
	err := InNetns(t.NetnsPath, func() error {
		out, err := save(ctx, b, f)
		lines = parseSave(out).ownRules()
		return err
	})
	return lines, err
}

// Cleanup removes exactly meshlet's rules and chains from both families of
// every backend that holds them in the target namespace (chosen backend
// only, when forced). Cleaning a clean namespace is a no-op.
func Cleanup(ctx context.Context, t Target) error {
	err := InNetns(t.NetnsPath, func() error {
		backends := []Backend{BackendNFT, BackendLegacy}
		if t.Backend == BackendNFT || t.Backend == BackendLegacy {
			backends = []Backend{t.Backend}
		}
		var errs []error
		for _, b := range backends {
			errs = append(errs, cleanBackend(ctx, b, t.log()))
		}
		removePassthroughAddr()
		return errors.Join(errs...)
	})
	if err != nil {
		return fmt.Errorf("cleaning up capture rules in %s: %w", nsName(t.NetnsPath), err)
	}
	return nil
}

// cleanBackend removes meshlet's rules and chains from both families of
// backend b in the current namespace.
func cleanBackend(ctx context.Context, b Backend, log *slog.Logger) error {
	var errs []error
	for _, f := range []Family{IPv4, IPv6} {
		if b == BackendLegacy && !legacyTablePresent(f) {
			continue // no legacy nat table: nothing of ours (and do not create one)
		}
		out, err := save(ctx, b, f)
		if err != nil {
			continue // backend or family not usable here: nothing of ours in it
		}
		input := cleanupInput(parseSave(out))
		if input == "" {
			continue
		}
		if err := restore(ctx, b, f, input); err != nil {
			errs = append(errs, fmt.Errorf("removing %s rules (%s): %w", f, b, err))
			continue
		}
		log.Info("capture rules removed", "backend", b, "family", f.String())
	}
	return errors.Join(errs...)
}

func cleanupInput(st natState) string {
	var present []string
	for _, ch := range OwnChains {
		if slices.Contains(st.chains, ch) {
			present = append(present, ch)
		}
	}
	dels := st.deletesOutsideOwnChains()
	if len(present) == 0 && len(dels) == 0 {
		return ""
	}
	var b strings.Builder
	b.WriteString("*nat\n")
	for _, d := range dels {
		b.WriteString(d + "\n")
	}
	for _, ch := range present {
		fmt.Fprintf(&b, ":%s - [0:0]\n", ch)
	}
	for _, ch := range present {
		fmt.Fprintf(&b, "-X %s\n", ch)
	}
	b.WriteString("COMMIT\n")
	return b.String()
}

// passthroughV6 is assigned to lo so the proxy can use ::6 as the source of
// inbound passthrough connections (127.0.0.6 is loopback already; ::6 is not).
var passthroughV6 = &net.IPNet{IP: net.ParseIP("::6"), Mask: net.CIDRMask(128, 128)}

func ensurePassthroughAddr() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("finding lo: %w", err)
	}
	if err := netlink.AddrReplace(lo, &netlink.Addr{IPNet: passthroughV6, Flags: unix.IFA_F_NODAD}); err != nil {
		return fmt.Errorf("adding ::6/128 to lo: %w", err)
	}
	return nil
}

func removePassthroughAddr() {
	if lo, err := netlink.LinkByName("lo"); err == nil {
		_ = netlink.AddrDel(lo, &netlink.Addr{IPNet: passthroughV6})
	}
}

func nsName(p string) string {
	if p == "" {
		return "current netns"
	}
	return p
}
