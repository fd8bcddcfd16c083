package initcmd_test

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/cmd/meshlet/app/initcmd"
	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/initcni/capture/capturetest"
	"github.com/meshlet/meshlet/test/netlab"
	"github.com/meshlet/meshlet/webhook/inject"
)

// TestMain doubles as `meshlet` for child processes: with MLCAP_MESHLET=1
// the test binary runs the init command with its arguments and exits with
// its exit code, so tests can run it in a netns as another UID.
func TestMain(m *testing.M) {
	if os.Getenv("MLCAP_MESHLET") == "1" {
		var stdout, stderr bytes.Buffer
		err := runInit(context.Background(), os.Args[1:], &stdout, &stderr)
		os.Stdout.Write(stdout.Bytes())
		os.Stderr.Write(stderr.Bytes())
		os.Exit(cli.ExitCode(err, os.Stderr))
	}
	code := m.Run()
	netlab.RemoveSelfCopy()
	os.Exit(code)
}

func runInit(ctx context.Context, args []string, out, errw *bytes.Buffer) error {
	return initcmd.Run(ctx, args, cli.Streams{In: strings.NewReader(""), Out: out, Err: errw})
}

func exitCode(err error) int { return cli.ExitCode(err, &bytes.Buffer{}) }

// emittedArgs injects a pod with the given annotations (default config, CNI
// mode or not) and returns the capture flags of its istio-init (or
// istio-validation) container: what `meshlet init` really receives. It
// returns nil when the pod is refused or gets no such container.
func emittedArgs(t *testing.T, cni bool, ann map[string]string) []string {
	t.Helper()
	cfg := inject.DefaultConfig()
	cfg.CNI.Enabled = cni
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: "default", Annotations: ann},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app:1"}}},
	}
	out, _, err := inject.Inject(pod, inject.Namespace{Name: "default"}, &cfg, inject.Options{AutoNativeSidecar: true})
	if err != nil {
		return nil
	}
	for _, c := range out.Spec.InitContainers {
		if c.Name != inject.ContainerInit && c.Name != inject.ContainerValidation {
			continue
		}
		if len(c.Args) == 0 || c.Args[0] != "init" {
			t.Fatalf("%s args %q do not start with init", c.Name, c.Args)
		}
		return slices.DeleteFunc(slices.Clone(c.Args[1:]), func(a string) bool { return a == "--validate" })
	}
	return nil
}

// TestPrivilegedInitEmittedArgs applies, in a fresh namespace each, the
// istio-init arguments the injector emits for the annotation sets that
// used to be admitted and then refused (includeInboundPorts naming the
// sidecar's ports, overlapping inclusions and exclusions): the real
// `meshlet init` must install and read back the rules (exit 0), and a
// refused set must have been refused at admission.
func TestPrivilegedInitEmittedArgs(t *testing.T) {
	netlab.Require(t)
	admitted := 0
	for _, ann := range capturetest.Seeds {
		args := emittedArgs(t, false, ann)
		if args == nil {
			continue
		}
		admitted++
		ns := netlab.NewNS(t, "mlcap-")
		var out, errb bytes.Buffer
		if err := runInit(t.Context(), append(args, "--netns", ns.Path), &out, &errb); err != nil {
			t.Errorf("annotations %q: admitted, but meshlet init %q fails (exit %d): %v\n%s", ann, args, exitCode(err), err, errb.String())
		}
	}
	t.Logf("%d of %d seed sets admitted and applied", admitted, len(capturetest.Seeds))
	if admitted < len(capturetest.Seeds)/2 {
		t.Errorf("only %d of %d seed annotation sets admitted", admitted, len(capturetest.Seeds))
	}
}

func renderDefault(t *testing.T) string {
	t.Helper()
	c, err := capture.BuildConfig(capture.NewOptions())
	if err != nil {
		t.Fatal(err)
	}
	return "# iptables-restore --noflush\n" + capture.Rules(c, capture.IPv4).Render()
}

func TestDryRun(t *testing.T) {
	want := renderDefault(t)
	for _, tc := range []struct {
		name string
		args []string
		env  map[string]string
	}{
		{"bare", nil, nil},
		{"istio-init args the injector emits", emittedArgs(t, false, nil), nil},
		{"istio-validation args the injector emits", emittedArgs(t, true, nil), nil},
		{"long names", []string{"--proxy-port=15001", "--inbound-capture-port=15006", "--inbound-ports=*", "--outbound-ip-ranges-exclude="}, nil},
		{"env forms", nil, map[string]string{"MESHLET_PROXY_UID": "1337", "MESHLET_INBOUND_PORTS_EXCLUDE": "22,15090,15021,15020"}},
		{"flag wins over env", []string{"-p", "15001"}, map[string]string{"MESHLET_PROXY_PORT": "1"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			var out, errb bytes.Buffer
			if err := runInit(t.Context(), append([]string{"--dry-run"}, tc.args...), &out, &errb); err != nil {
				t.Fatalf("%v\n%s", err, errb.String())
			}
			if out.String() != want {
				t.Errorf("dry run differs from the default rules:\n%s", out.String())
			}
		})
	}
}

func TestEnvSetsOptions(t *testing.T) {
	t.Setenv("MESHLET_INBOUND_PORTS", "")
	t.Setenv("MESHLET_OUTBOUND_IP_RANGES", "10.0.0.0/8")
	var out, errb bytes.Buffer
	if err := runInit(t.Context(), []string{"--dry-run"}, &out, &errb); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out.String(), "PREROUTING") || !strings.Contains(out.String(), "-d 10.0.0.0/8") {
		t.Errorf("env forms not applied:\n%s", out.String())
	}
}

func TestInvalidOptionsExit2(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want []string
	}{
		{[]string{"-m", "TPROXY"}, []string{"--interception-mode (-m)", "not yet supported"}},
		{[]string{"-p", "x", "-i", "300.0.0.0/8", "-b", "80,http", "-c", "lo"}, []string{"(-p)", "(-i)", "(-b)", "(-c)"}},
		{[]string{"--iptables-backend", "iptables"}, []string{"--iptables-backend"}},
		{[]string{"--dry-run", "--cleanup"}, []string{"exclude each other"}},
	} {
		var out, errb bytes.Buffer
		err := runInit(t.Context(), tc.args, &out, &errb)
		if code := exitCode(err); code != initcmd.ExitInvalidOptions {
			t.Errorf("%v: exit %d (%v), want %d", tc.args, code, err, initcmd.ExitInvalidOptions)
			continue
		}
		for _, w := range tc.want {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%v: error %q does not name %q", tc.args, err, w)
			}
		}
	}
}

func TestPrivilegedInitApplyCleanup(t *testing.T) {
	netlab.Require(t)
	ns := netlab.NewNS(t, "mlcap-")
	var out, errb bytes.Buffer
	args := append(emittedArgs(t, false, nil), "--netns", ns.Path)
	for range 2 { // an init container restart converges
		if err := runInit(t.Context(), args, &out, &errb); err != nil {
			t.Fatalf("%v\n%s", err, errb.String())
		}
	}
	if !strings.Contains(errb.String(), "iptables backend chosen") || !strings.Contains(errb.String(), "reason=") {
		t.Errorf("backend choice not logged:\n%s", errb.String())
	}
	c, _ := capture.BuildConfig(capture.NewOptions())
	if err := capture.Check(t.Context(), c, capture.Target{NetnsPath: ns.Path}); err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if err := runInit(t.Context(), []string{"--cleanup", "--netns", ns.Path}, &out, &errb); err != nil {
			t.Fatal(err)
		}
	}
	if err := capture.Check(t.Context(), c, capture.Target{NetnsPath: ns.Path}); !errors.Is(err, capture.ErrMismatch) {
		t.Fatalf("after cleanup Check = %v, want mismatch", err)
	}
}

// TestPrivilegedValidate runs `meshlet init --validate` as an unprivileged
// child process (UID/GID 1337, no capabilities) in a pod netns.
func TestPrivilegedValidate(t *testing.T) {
	netlab.Require(t)
	self := netlab.SelfCopy(t)
	run := func(ns *netlab.NS, uid, gid int, extra ...string) (int, string) {
		cmd := exec.Command(self, append([]string{"--validate", "--validate-timeout", "1s"}, extra...)...)
		cmd.Env = []string{"MLCAP_MESHLET=1"}
		out, err := ns.Run(cmd, uid, gid)
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return ee.ExitCode(), string(out)
		}
		if err != nil {
			t.Fatal(err)
		}
		return 0, string(out)
	}
	captured := netlab.NewNS(t, "mlcap-")
	var out, errb bytes.Buffer
	if err := runInit(t.Context(), []string{"--netns", captured.Path}, &out, &errb); err != nil {
		t.Fatal(err)
	}
	if code, msg := run(captured, 1337, 1337, "--validate-timeout", "10s"); code != 0 {
		t.Errorf("validate with rules: exit %d: %s", code, msg)
	} else if !strings.Contains(msg, "originalDst=127.0.0.6:15002") {
		t.Errorf("validate did not report the original destination: %s", msg)
	}
	// The flags the injector gives istio-validation.
	if code, msg := run(captured, 1337, 1337, append(emittedArgs(t, true, nil), "--validate-timeout", "10s")...); code != 0 {
		t.Errorf("validate with injector flags: exit %d: %s", code, msg)
	}
	// Dual stack: the pod has a global IPv6 address, so both families are
	// probed; rules for IPv4 only must fail validation.
	peer := netlab.NewNS(t, "mlcap-")
	dual := netlab.NewNS(t, "mlcap-")
	netlab.Veth(t, peer, "p0", []string{"10.211.80.1/24", "fd00:211:80::1/64"}, dual, "eth0", []string{"10.211.80.2/24", "fd00:211:80::2/64"})
	if err := runInit(t.Context(), []string{"--netns", dual.Path}, &out, &errb); err != nil {
		t.Fatal(err)
	}
	// Cases that must pass get a long timeout (they end at the first
	// redirected probe; a loaded shared host can take more than 1s).
	if code, msg := run(dual, 1337, 1337, "--validate-timeout", "10s"); code != 0 || !strings.Contains(msg, "originalDst6=[fd00:211:80::2]:15002") {
		t.Errorf("dual-stack validate: exit %d: %s", code, msg)
	}
	v4only := netlab.NewNS(t, "mlcap-")
	netlab.Veth(t, peer, "p1", []string{"10.211.81.1/24", "fd00:211:81::1/64"}, v4only, "eth0", []string{"10.211.81.2/24", "fd00:211:81::2/64"})
	if err := runInit(t.Context(), []string{"--netns", v4only.Path, "--ipv6", "off"}, &out, &errb); err != nil {
		t.Fatal(err)
	}
	if code, msg := run(v4only, 1337, 1337); code != initcmd.ExitValidationFailed || !strings.Contains(msg, "fd00:211:81::2") {
		t.Errorf("validate with IPv4-only rules in a dual-stack pod: exit %d, want %d: %s", code, initcmd.ExitValidationFailed, msg)
	}
	if code, msg := run(v4only, 1337, 1337, "--ipv6", "off", "--validate-timeout", "10s"); code != 0 {
		t.Errorf("validate --ipv6 off with IPv4-only rules: exit %d: %s", code, msg)
	}

	bare := netlab.NewNS(t, "mlcap-")
	if code, msg := run(bare, 1337, 1337); code != initcmd.ExitValidationFailed || !strings.Contains(msg, "not working") {
		t.Errorf("validate without rules: exit %d, want %d: %s", code, initcmd.ExitValidationFailed, msg)
	}
	if code, msg := run(captured, 1000, 1000); code != initcmd.ExitInvalidOptions || !strings.Contains(msg, "proxy UID or GID") {
		t.Errorf("validate as uid 1000: exit %d, want %d: %s", code, initcmd.ExitInvalidOptions, msg)
	}
}

// TestPrivilegedReadBackMismatchExit3 wraps the real iptables-nft-save so
// the read-back silently loses one rule (as a broken backend or a racing
// writer would): init must fail with exit 3 and name the missing rule.
func TestPrivilegedReadBackMismatchExit3(t *testing.T) {
	netlab.Require(t)
	realSave, err := exec.LookPath("iptables-nft-save")
	if err != nil {
		t.Skip("needs iptables-nft-save")
	}
	dir := t.TempDir()
	script := "#!/bin/sh\n" + realSave + " \"$@\" | grep -v -- '--dport 22 '\n"
	if err := os.WriteFile(dir+"/iptables-nft-save", []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir+":"+os.Getenv("PATH"))
	ns := netlab.NewNS(t, "mlcap-")
	var out, errb bytes.Buffer
	err = runInit(t.Context(), []string{"--netns", ns.Path, "--iptables-backend", "nft", "--ipv6", "off"}, &out, &errb)
	if code := exitCode(err); code != initcmd.ExitMismatch {
		t.Fatalf("exit %d (%v), want %d", code, err, initcmd.ExitMismatch)
	}
	if !strings.Contains(err.Error(), "missing:") || !strings.Contains(err.Error(), "--dport 22 ") {
		t.Errorf("difference not shown: %v", err)
	}
}
