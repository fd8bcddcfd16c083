package cluster

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// hostState is what the host looked like before the first Up, so Down puts
// it back.
type hostState struct {
	Sysctls map[string]string `json:"sysctls"`
	// Existed says which host paths that the node's daemons may create
	// existed before.
	Existed map[string]bool `json:"existed"`
	// Netns lists /var/run/netns entries that existed before.
	Netns []string `json:"netns"`
}

// sysctls the cluster sets (the first two) or that kubelet and kube-proxy may change.
var sysctls = map[string]string{
	"net/ipv4/ip_forward":                 "1",
	"net/bridge/bridge-nf-call-iptables":  "1",
	"net/bridge/bridge-nf-call-ip6tables": "",
	"net/ipv4/conf/all/route_localnet":    "",
	"vm/overcommit_memory":                "",
	"vm/panic_on_oom":                     "",
	"kernel/panic":                        "",
	"kernel/panic_on_oops":                "",
	"kernel/keys/root_maxkeys":            "",
	"kernel/keys/root_maxbytes":           "",
	"net/netfilter/nf_conntrack_max":      "",
}

// hostPaths are folders containerd, the CNI plugins and kubelet create
// outside Dir no matter how they are configured.
var hostPaths = []string{"/run/containerd", "/var/lib/cni", "/var/log/containers", "/var/log/pods", "/var/run/netns"}

func (c *Cluster) saveHostState() error {
	p := c.path("host-state.json")
	if _, err := os.Stat(p); err == nil {
		return nil // recorded by the first Up; the host now has our changes
	}
	st := hostState{Sysctls: map[string]string{}, Existed: map[string]bool{}}
	for k := range sysctls {
		if b, err := os.ReadFile("/proc/sys/" + k); err == nil {
			st.Sysctls[k] = strings.TrimSpace(string(b))
		}
	}
	for _, hp := range hostPaths {
		_, err := os.Lstat(hp)
		st.Existed[hp] = err == nil
	}
	ents, _ := os.ReadDir("/var/run/netns")
	for _, e := range ents {
		st.Netns = append(st.Netns, e.Name())
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(p, b, 0o644)
}

func ip(ctx context.Context, args ...string) error { return run(ctx, io.Discard, "ip", args...) }

func linkExists(name string) bool {
	_, err := os.Stat("/sys/class/net/" + name)
	return err == nil
}

// setupNetwork creates the node bridge, the service route, the sysctls and
// the FORWARD guard (idempotent).
func (c *Cluster) setupNetwork(ctx context.Context) error {
	if !linkExists(NodeBridge) {
		if err := ip(ctx, "link", "add", NodeBridge, "type", "bridge"); err != nil {
			return err
		}
	}
	if err := ip(ctx, "addr", "replace", NodeIP+"/24", "dev", NodeBridge); err != nil {
		return err
	}
	if err := ip(ctx, "link", "set", NodeBridge, "up"); err != nil {
		return err
	}
	// Service traffic that kube-proxy does not rewrite ends on a bridge with
	// no ports instead of leaving the machine.
	if err := ip(ctx, "route", "replace", ServiceCIDR, "dev", NodeBridge); err != nil {
		return err
	}
	for k, v := range sysctls {
		if v != "" {
			if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
				return fmt.Errorf("sysctl %s=%s: %w", k, v, err)
			}
		}
	}
	ipt := func(args ...string) error {
		return run(ctx, io.Discard, "iptables", append([]string{"-w"}, args...)...)
	}
	_ = ipt("-N", guardChain)
	if err := ipt("-F", guardChain); err != nil {
		return err
	}
	for _, rule := range [][]string{
		{"-s", ClusterCIDR, "-d", ClusterCIDR, "-j", "ACCEPT"},
		{"-s", ClusterCIDR, "-j", "DROP"},
		{"-d", ClusterCIDR, "-j", "DROP"},
	} {
		if err := ipt(append([]string{"-A", guardChain, "-m", "comment", "--comment", "meshlet test cluster: pod traffic stays on the machine"}, rule...)...); err != nil {
			return err
		}
	}
	if ipt("-C", "FORWARD", "-j", guardChain) != nil {
		if err := ipt("-I", "FORWARD", "1", "-j", guardChain); err != nil {
			return err
		}
	}
	return nil
}

// Down stops the cluster and restores the host. It is safe to call when the
// cluster is partly or not at all up.
func (c *Cluster) Down(ctx context.Context) error {
	if _, err := os.Stat(c.Dir); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	start := time.Now()
	var errs []error
	for _, d := range []string{"coredns", "kube-proxy", "kubelet"} {
		c.stopDaemon(d, 10*time.Second)
	}
	// Containers first (their processes live in the kubepods cgroups), then
	// the shims of this containerd (found by its unique socket path).
	c.killCgroupProcs()
	c.killShims()
	for _, d := range []string{"containerd", "kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"} {
		c.stopDaemon(d, 10*time.Second)
	}
	if _, err := os.Stat(filepath.Join(c.BinDir, "kube-proxy")); err == nil {
		_ = run(ctx, io.Discard, filepath.Join(c.BinDir, "kube-proxy"), "--cleanup", "--v=0")
	}
	errs = append(errs, c.restoreHost(ctx)...)
	if err := os.RemoveAll(c.Dir); err != nil {
		errs = append(errs, err)
	}
	c.logf("down in %s", time.Since(start).Round(100*time.Millisecond))
	return errors.Join(errs...)
}

func (c *Cluster) restoreHost(ctx context.Context) []error {
	var errs []error
	var st hostState
	if b, err := os.ReadFile(c.path("host-state.json")); err == nil {
		if err := json.Unmarshal(b, &st); err != nil {
			errs = append(errs, err)
		}
	}
	// Mounts under Dir (kubelet volumes, containerd rootfs and shm) and the
	// pods' network namespaces.
	beforeNetns := map[string]bool{}
	for _, n := range st.Netns {
		beforeNetns[n] = true
	}
	var ours []string
	ents, _ := os.ReadDir("/var/run/netns")
	for _, e := range ents {
		if !beforeNetns[e.Name()] && strings.HasPrefix(e.Name(), "cni-") {
			ours = append(ours, filepath.Join("/var/run/netns", e.Name()))
		}
	}
	for _, m := range mountsUnder(append([]string{c.Dir}, ours...)) {
		if err := syscall.Unmount(m, syscall.MNT_DETACH); err != nil {
			errs = append(errs, fmt.Errorf("unmounting %s: %w", m, err))
		}
	}
	for _, n := range ours {
		_ = os.Remove(n)
	}
	for _, l := range []string{PodBridge, NodeBridge} {
		if linkExists(l) {
			if err := ip(ctx, "link", "del", l); err != nil {
				errs = append(errs, err)
			}
		}
	}
	errs = append(errs, removeIptables(ctx)...)
	for k, v := range st.Sysctls {
		if b, err := os.ReadFile("/proc/sys/" + k); err == nil && strings.TrimSpace(string(b)) != v {
			if err := os.WriteFile("/proc/sys/"+k, []byte(v), 0o644); err != nil {
				errs = append(errs, fmt.Errorf("restoring sysctl %s=%s: %w", k, v, err))
			}
		}
	}
	removeCgroups()
	for _, hp := range hostPaths {
		if existed, ok := st.Existed[hp]; ok && !existed {
			if hp == "/var/run/netns" {
				if ents, _ := os.ReadDir(hp); len(ents) > 0 {
					continue // someone else's namespaces appeared meanwhile
				}
			}
			if err := os.RemoveAll(hp); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errs
}

// mountsUnder lists mount points at or below any of roots, deepest first.
func mountsUnder(roots []string) []string {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return nil
	}
	defer f.Close()
	var out []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		mp := strings.ReplaceAll(fields[4], `\040`, " ")
		for _, r := range roots {
			if mp == r || strings.HasPrefix(mp, r+"/") {
				out = append(out, mp)
				break
			}
		}
	}
	sort.Slice(out, func(i, j int) bool { return strings.Count(out[i], "/") > strings.Count(out[j], "/") })
	return out
}

// removeIptables deletes the guard chain and every KUBE-* chain (kubelet's
// and kube-proxy's leftovers) with the rules that jump to them, for both IP
// families.
func removeIptables(ctx context.Context) []error {
	var errs []error
	ours := func(ch string) bool { return strings.HasPrefix(ch, "KUBE-") || ch == guardChain }
	for _, bin := range []string{"iptables", "ip6tables"} {
		for _, table := range []string{"filter", "nat", "mangle", "raw"} {
			out, err := exec.CommandContext(ctx, bin, "-w", "-t", table, "-S").Output()
			if err != nil {
				continue
			}
			var chains, others []string
			for _, line := range strings.Split(string(out), "\n") {
				f := strings.Fields(line)
				if len(f) < 2 || (f[0] != "-N" && f[0] != "-P") {
					continue
				}
				if ours(f[1]) {
					chains = append(chains, f[1])
				} else {
					others = append(others, f[1])
				}
			}
			// Jumps into our chains from the others, by rule number, last first.
			for _, ch := range others {
				out, err := exec.CommandContext(ctx, bin, "-w", "-t", table, "-L", ch, "-n", "--line-numbers").Output()
				if err != nil {
					continue
				}
				var nums []int
				for _, line := range strings.Split(string(out), "\n") {
					f := strings.Fields(line)
					if len(f) >= 2 && ours(f[1]) {
						if n, err := strconv.Atoi(f[0]); err == nil {
							nums = append(nums, n)
						}
					}
				}
				for i := len(nums) - 1; i >= 0; i-- {
					if err := exec.CommandContext(ctx, bin, "-w", "-t", table, "-D", ch, strconv.Itoa(nums[i])).Run(); err != nil {
						errs = append(errs, fmt.Errorf("%s -t %s -D %s %d: %w", bin, table, ch, nums[i], err))
					}
				}
			}
			for _, ch := range chains {
				_ = exec.CommandContext(ctx, bin, "-w", "-t", table, "-F", ch).Run()
			}
			for _, ch := range chains {
				if err := exec.CommandContext(ctx, bin, "-w", "-t", table, "-X", ch).Run(); err != nil {
					errs = append(errs, fmt.Errorf("%s -t %s -X %s: %w", bin, table, ch, err))
				}
			}
		}
	}
	return errs
}

// cgroupRoots are the kubelet's pod cgroups (cgroupfs driver) in every
// cgroup v1 hierarchy and the unified one.
func cgroupRoots() []string {
	m, _ := filepath.Glob("/sys/fs/cgroup/*/kubepods")
	if _, err := os.Stat("/sys/fs/cgroup/kubepods"); err == nil {
		m = append(m, "/sys/fs/cgroup/kubepods")
	}
	return m
}

// killCgroupProcs SIGKILLs every process in the pod cgroups.
func (c *Cluster) killCgroupProcs() {
	for round := 0; round < 20; round++ {
		n := 0
		for _, root := range cgroupRoots() {
			_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
				if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
					return nil
				}
				b, _ := os.ReadFile(p)
				for _, s := range strings.Fields(string(b)) {
					if pid, err := strconv.Atoi(s); err == nil && pid > 1 {
						_ = syscall.Kill(pid, syscall.SIGKILL)
						n++
					}
				}
				return nil
			})
		}
		if n == 0 {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// killShims SIGKILLs containerd-shim processes serving this cluster's
// containerd (their command line names its socket, unique to Dir).
func (c *Cluster) killShims() {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) == 0 || !strings.HasPrefix(filepath.Base(args[0]), "containerd-shim") {
			continue
		}
		for _, a := range args {
			if a == c.ContainerdSocket {
				pid, _ := strconv.Atoi(strings.Split(p, "/")[2])
				_ = syscall.Kill(pid, syscall.SIGKILL)
				break
			}
		}
	}
}

// removeCgroups removes the (now empty) pod cgroups, deepest first.
func removeCgroups() {
	for _, root := range cgroupRoots() {
		var dirs []string
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		sort.Slice(dirs, func(i, j int) bool { return len(dirs[i]) > len(dirs[j]) })
		for _, d := range dirs {
			_ = syscall.Rmdir(d)
		}
	}
}
