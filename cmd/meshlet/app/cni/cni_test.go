package cni_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	cnicmd "github.com/meshlet/meshlet/cmd/meshlet/app/cni"
	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/initcni/cni"
	"github.com/meshlet/meshlet/test/netlab"
)

// TestMain doubles as the plugin binary: with MLCAP_CNI_PLUGIN=1 the test
// binary runs exactly what `meshlet cni` runs (the cobra command and skel)
// and exits, so the runtime-facing protocol is exercised through a real
// exec with real CNI_* environment and stdin.
func TestMain(m *testing.M) {
	if os.Getenv("MLCAP_CNI_PLUGIN") == "1" {
		cmd := cnicmd.New(cli.Streams{In: os.Stdin, Out: os.Stdout, Err: os.Stderr})
		cmd.SetArgs([]string{})
		os.Exit(cli.ExitCode(cmd.Execute(), os.Stderr))
	}
	code := m.Run()
	netlab.RemoveSelfCopy()
	os.Exit(code)
}

// pluginDir returns a CNI bin dir holding meshlet-cni. With MESHLET_BIN set
// (e.g. bin/meshlet from `make build`) it is a link to the real binary, as
// cni-install makes it; otherwise a script runs this test binary in plugin
// mode.
func pluginDir(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	script := "#!/bin/sh\nMLCAP_CNI_PLUGIN=1 exec " + netlab.SelfCopy(t) + " \"$@\"\n"
	if bin := os.Getenv("MESHLET_BIN"); bin != "" {
		abs, err := filepath.Abs(bin)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(abs, filepath.Join(dir, cni.PluginType)); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	if err := os.WriteFile(filepath.Join(dir, cni.PluginType), []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return dir
}

func requireBridge(t *testing.T) {
	t.Helper()
	for _, p := range []string{"/usr/lib/cni/bridge", "/usr/lib/cni/host-local"} {
		if _, err := os.Stat(p); err != nil {
			t.Skipf("needs Debian's containernetworking-plugins (%s): %v", p, err)
		}
	}
}

func conflist(t *testing.T, name, bridge, subnet4, subnet6 string, meshlet map[string]any) *libcni.NetworkConfigList {
	t.Helper()
	meshlet["type"] = cni.PluginType
	doc := map[string]any{
		"cniVersion": "1.0.0", // Debian's bridge (plugins 1.1.1) speaks up to 1.0.0
		"name":       name,
		"plugins": []any{
			map[string]any{
				"type": "bridge", "bridge": bridge, "isGateway": true, "ipMasq": false,
				"ipam": map[string]any{
					"type":    "host-local",
					"dataDir": t.TempDir(),
					"ranges":  []any{[]any{map[string]any{"subnet": subnet4}}, []any{map[string]any{"subnet": subnet6}}},
				},
			},
			meshlet,
		},
	}
	b, _ := json.Marshal(doc)
	l, err := libcni.ConfListFromBytes(b)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func podArgs(ns, name string) [][2]string {
	return [][2]string{{"IgnoreUnknown", "1"}, {"K8S_POD_NAMESPACE", ns}, {"K8S_POD_NAME", name}}
}

// execPlugin runs the plugin once with the given verb and stdin config.
func execPlugin(t *testing.T, dir, verb, netns string, args [][2]string, conf []byte) ([]byte, error) {
	t.Helper()
	var kv []string
	for _, a := range args {
		kv = append(kv, a[0]+"="+a[1])
	}
	cmd := exec.Command(filepath.Join(dir, cni.PluginType))
	cmd.Env = []string{"CNI_COMMAND=" + verb, "CNI_CONTAINERID=mlcap-ctr", "CNI_NETNS=" + netns, "CNI_IFNAME=eth0",
		"CNI_PATH=" + dir, "CNI_ARGS=" + strings.Join(kv, ";"), "PATH=" + os.Getenv("PATH")}
	cmd.Stdin = bytes.NewReader(conf)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s: %w: stdout %s stderr %s", verb, err, out, stderr.String())
	}
	return out, nil
}

func hasMeshletRules(t *testing.T, ns *netlab.NS) bool {
	t.Helper()
	for _, b := range []string{"nft", "legacy"} {
		// A failing iptables-save fails the test: its empty output must not
		// pass as "no rules".
		out, err := ns.Run(exec.Command("iptables-"+b+"-save", "-t", "nat"), -1, -1)
		if err != nil {
			t.Fatalf("iptables-%s-save in %s: %v: %s", b, ns.Name, err, out)
		}
		if strings.Contains(string(out), "meshlet:") {
			return true
		}
	}
	return false
}

// TestPrivilegedPluginChainedAfterBridge runs a real conflist (Debian's
// bridge + host-local, then meshlet-cni) through libcni inside a "node"
// netns against real pod netns: ADD, CHECK (also after tampering), DEL;
// prevResult passes through unchanged; pods without the status annotation
// are left alone. The pod lookup is the plugin's staticPod option here;
// TestEnvtestPrivilegedPodLookup covers the API server path.
func TestPrivilegedPluginChainedAfterBridge(t *testing.T) {
	netlab.Require(t)
	requireBridge(t)
	ctx := t.Context()
	dir := pluginDir(t)
	node := netlab.NewNS(t, "mlcap-")
	pod := netlab.NewNS(t, "mlcap-")
	plain := netlab.NewNS(t, "mlcap-")
	cfg := libcni.NewCNIConfig([]string{dir, "/usr/lib/cni"}, nil)

	injected := conflist(t, "mlcap-net", "mlcapbr0", "10.211.60.0/24", "fd00:211:60::/64", map[string]any{
		"logLevel": "debug",
		"capture":  map[string]any{"excludeInboundPorts": "22,15090,15021,15020"},
		"staticPod": map[string]any{"annotations": map[string]string{
			capture.AnnotationStatus:              `{"initContainers":null,"containers":["istio-proxy"]}`,
			capture.AnnotationExcludeInboundPorts: "8081",
		}},
	})
	rt := &libcni.RuntimeConf{ContainerID: "mlcap-c1", NetNS: pod.Path, IfName: "eth0", Args: podArgs("default", "app-1")}
	var res types.Result
	if err := node.Do(func() error {
		var err error
		res, err = cfg.AddNetworkList(ctx, injected, rt)
		return err
	}); err != nil {
		t.Fatalf("ADD: %v", err)
	}
	r100, err := types100.NewResultFromResult(res)
	if err != nil {
		t.Fatal(err)
	}
	if len(r100.IPs) != 2 || !strings.HasPrefix(r100.IPs[0].Address.String(), "10.211.60.") {
		t.Fatalf("result does not carry the bridge's IPs: %+v", r100)
	}
	want := mustConfig(t, "22,15090,15021,15020,8081")
	want.IPv6 = capture.IPv6On // the bridge gave the pod a global IPv6 address
	if err := capture.Check(ctx, want, capture.Target{NetnsPath: pod.Path}); err != nil {
		t.Fatalf("rules in the pod after ADD: %v", err)
	}
	if err := node.Do(func() error { return cfg.CheckNetworkList(ctx, injected, rt) }); err != nil {
		t.Fatalf("CHECK: %v", err)
	}

	// prevResult passes through unchanged (direct exec with that prevResult).
	r100.CNIVersion = "1.0.0" // the list's version, as libcni hands it on
	prev, _ := json.Marshal(r100)
	var direct map[string]any
	_ = json.Unmarshal(injected.Plugins[1].Bytes, &direct)
	direct["cniVersion"], direct["name"] = "1.0.0", "mlcap-net"
	direct["prevResult"] = json.RawMessage(prev)
	stdin, _ := json.Marshal(direct)
	out, err := execPlugin(t, dir, "ADD", pod.Path, podArgs("default", "app-1"), stdin)
	if err != nil {
		t.Fatal(err)
	}
	var a, b any
	_ = json.Unmarshal(out, &a)
	_ = json.Unmarshal(prev, &b)
	ja, _ := json.Marshal(a)
	jb, _ := json.Marshal(b)
	if !bytes.Equal(ja, jb) {
		t.Errorf("prevResult changed:\n got %s\nwant %s", ja, jb)
	}

	// Someone removes a rule: CHECK must fail and name the difference.
	if _, err := pod.Run(exec.Command("sh", "-c", "iptables-nft -t nat -D ISTIO_INBOUND 2 || iptables-legacy -t nat -D ISTIO_INBOUND 2"), -1, -1); err != nil {
		t.Fatal(err)
	}
	err = node.Do(func() error { return cfg.CheckNetworkList(ctx, injected, rt) })
	if err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("CHECK after tampering: %v", err)
	}
	if err := node.Do(func() error { return cfg.DelNetworkList(ctx, injected, rt) }); err != nil {
		t.Fatalf("DEL: %v", err)
	}

	// A pod without the status annotation: no rules, result still passed on.
	notInjected := conflist(t, "mlcap-net2", "mlcapbr1", "10.211.61.0/24", "fd00:211:61::/64", map[string]any{
		"staticPod": map[string]any{"annotations": map[string]string{"app": "x"}},
	})
	rt2 := &libcni.RuntimeConf{ContainerID: "mlcap-c2", NetNS: plain.Path, IfName: "eth0", Args: podArgs("default", "plain")}
	if err := node.Do(func() error {
		var err error
		res, err = cfg.AddNetworkList(ctx, notInjected, rt2)
		return err
	}); err != nil {
		t.Fatalf("ADD (not injected): %v", err)
	}
	if res == nil || hasMeshletRules(t, plain) {
		t.Errorf("not-injected pod got rules (result %v)", res)
	}

	// STATUS and GC (CNI 1.1) answer; a missing kubeconfig is reported.
	for _, tc := range []struct {
		conf    string
		wantErr string
	}{
		{`{"cniVersion":"1.1.0","name":"n","type":"meshlet-cni","staticPod":{"annotations":{}}}`, ""},
		{`{"cniVersion":"1.1.0","name":"n","type":"meshlet-cni","kubeconfig":"/nonexistent/kc"}`, `"code":50`},
	} {
		out, err := execPlugin(t, dir, "STATUS", "", nil, []byte(tc.conf))
		if tc.wantErr == "" && err != nil {
			t.Errorf("STATUS: %v", err)
		}
		if tc.wantErr != "" && (err == nil || !strings.Contains(string(out), tc.wantErr)) {
			t.Errorf("STATUS with bad kubeconfig: %v %s", err, out)
		}
	}
	if _, err := execPlugin(t, dir, "GC", "", nil, []byte(`{"cniVersion":"1.1.0","name":"n","type":"meshlet-cni","cni.dev/valid-attachments":[]}`)); err != nil {
		t.Errorf("GC: %v", err)
	}
	// Errors are CNI JSON: an unchained invocation.
	out, err = execPlugin(t, dir, "ADD", pod.Path, nil, []byte(`{"cniVersion":"1.0.0","name":"n","type":"meshlet-cni"}`))
	var cerr types.Error
	if err == nil || json.Unmarshal(out, &cerr) != nil || cerr.Code != types.ErrInvalidNetworkConfig {
		t.Errorf("unchained ADD: %v %s", err, out)
	}
}

func mustConfig(t *testing.T, excludeInbound string) capture.Config {
	t.Helper()
	o := capture.NewOptions()
	o.InboundPortsExclude = excludeInbound
	c, err := capture.BuildConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
