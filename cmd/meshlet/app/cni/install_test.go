package cni_test

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	cnicmd "github.com/meshlet/meshlet/cmd/meshlet/app/cni"
	"github.com/meshlet/meshlet/initcni/cni"
)

func runInstall(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := cnicmd.NewInstall(cli.Streams{In: strings.NewReader(""), Out: &out, Err: &errb})
	cmd.SetArgs(args)
	cmd.SetOut(&out)
	cmd.SetErr(&errb)
	err := cmd.ExecuteContext(t.Context())
	return errb.String(), err
}

func TestInstallOnce(t *testing.T) {
	confDir, binDir := t.TempDir(), t.TempDir()
	kc := filepath.Join(t.TempDir(), "kc")
	if err := os.WriteFile(kc, []byte("apiVersion: v1\nkind: Config\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(confDir, "10-pods.conflist"), []byte(`{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	logs, err := runInstall(t, "--once", "--cni-conf-dir", confDir, "--cni-bin-dir", binDir, "--kubeconfig", kc,
		"--capture-defaults", `{"excludeInboundPorts":"22,15090,15021,15020","ipv6":"off"}`, "--iptables-backend", "nft")
	if err != nil {
		t.Fatalf("%v\n%s", err, logs)
	}
	b, _ := os.ReadFile(filepath.Join(confDir, "10-pods.conflist"))
	for _, w := range []string{`"type": "meshlet-cni"`, `"iptablesBackend": "nft"`, `"ipv6": "off"`, cni.KubeconfigName} {
		if !strings.Contains(string(b), w) {
			t.Errorf("conflist lacks %s:\n%s", w, b)
		}
	}
	for _, f := range []string{filepath.Join(binDir, "meshlet"), filepath.Join(binDir, cni.PluginType), filepath.Join(confDir, cni.KubeconfigName)} {
		if _, err := os.Stat(f); err != nil {
			t.Error(err)
		}
	}

	// Bad capture defaults are refused at install time, naming the key.
	_, err = runInstall(t, "--once", "--cni-conf-dir", confDir, "--cni-bin-dir", binDir, "--kubeconfig", kc,
		"--capture-defaults", `{"includeOutboundIPRanges":"10.0.0.0/99"}`)
	if err == nil || !strings.Contains(err.Error(), "capture.includeOutboundIPRanges") {
		t.Errorf("bad defaults: %v", err)
	}
	_, err = runInstall(t, "--once", "--cni-conf-dir", confDir, "--cni-bin-dir", binDir, "--kubeconfig", kc, "--capture-defaults", `{bad`)
	if err == nil || !strings.Contains(err.Error(), "--capture-defaults") {
		t.Errorf("bad JSON: %v", err)
	}
}
