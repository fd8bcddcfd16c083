package cni

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/initcni/capture"
)

func TestConfigFromAnnotations(t *testing.T) {
	t.Parallel()
	def := capture.NewOptions()
	c, err := ConfigFromAnnotations(def, map[string]string{
		capture.AnnotationIncludeInboundPorts:     "*",
		capture.AnnotationExcludeInboundPorts:     "8081,9090",
		capture.AnnotationIncludeOutboundIPRanges: "10.96.0.0/12",
		capture.AnnotationExcludeOutboundIPRanges: "10.96.0.10/32",
		capture.AnnotationIncludeOutboundPorts:    "443",
		capture.AnnotationExcludeOutboundPorts:    "5432",
		capture.AnnotationExcludeInterfaces:       "net1",
		capture.AnnotationInterceptionMode:        "REDIRECT",
	})
	if err != nil {
		t.Fatal(err)
	}
	if want := []uint16{15008, 22, 15090, 15021, 15020, 8081, 9090}; !slices.Equal(c.InboundExclude, want) {
		t.Errorf("excludeInboundPorts not added to the defaults: %v, want %v", c.InboundExclude, want)
	}
	if c.OutboundAll || len(c.OutboundRanges) != 1 || c.OutboundRanges[0].String() != "10.96.0.0/12" ||
		c.OutboundExclude[0].String() != "10.96.0.10/32" || !slices.Equal(c.OutboundPorts, []uint16{443}) ||
		!slices.Equal(c.OutboundPortsExclude, []uint16{5432}) || !slices.Equal(c.ExcludeInterfaces, []string{"net1"}) {
		t.Errorf("annotations not mapped: %+v", c)
	}
	// No annotations: the defaults, i.e. docs/design.md's rule set.
	c, err = ConfigFromAnnotations(def, nil)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := capture.BuildConfig(capture.NewOptions())
	if capture.Rules(c, capture.IPv4).Render() != capture.Rules(want, capture.IPv4).Render() {
		t.Error("no annotations does not give the default rules")
	}
	// includeInboundPorts "" turns inbound capture off.
	c, err = ConfigFromAnnotations(def, map[string]string{capture.AnnotationIncludeInboundPorts: ""})
	if err != nil || c.InboundAll || len(c.InboundPorts) != 0 {
		t.Errorf("empty includeInboundPorts: %v %+v", err, c)
	}
}

func TestConfigFromAnnotationsRejects(t *testing.T) {
	t.Parallel()
	_, err := ConfigFromAnnotations(capture.NewOptions(), map[string]string{
		capture.AnnotationExcludeOutboundIPRanges: "10.0.0.0/40",
		capture.AnnotationInterceptionMode:        "TPROXY",
	})
	if err == nil {
		t.Fatal("accepted")
	}
	for _, w := range []string{"annotation " + capture.AnnotationExcludeOutboundIPRanges, "10.0.0.0/40", "annotation " + capture.AnnotationInterceptionMode, "not yet supported"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error %q does not contain %q", err, w)
		}
	}
	bad := "x"
	_, err = ConfigFromAnnotations(CaptureDefaults{ProxyUID: &bad}.Options(), nil)
	if err == nil || !strings.Contains(err.Error(), "plugin config capture.proxyUID") {
		t.Errorf("bad default not named: %v", err)
	}
}

func TestMergeConfig(t *testing.T) {
	t.Parallel()
	entry := map[string]any{"type": PluginType, "kubeconfig": "/k"}
	conf := `{"cniVersion":"1.0.0","name":"k8s","type":"bridge","bridge":"cni0","ipam":{"type":"host-local"}}`
	out, err := MergeConfig([]byte(conf), entry)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Name       string           `json:"name"`
		CNIVersion string           `json:"cniVersion"`
		Plugins    []map[string]any `json:"plugins"`
	}
	if err := json.Unmarshal(out, &doc); err != nil {
		t.Fatal(err)
	}
	if doc.Name != "k8s" || doc.CNIVersion != "1.0.0" || len(doc.Plugins) != 2 ||
		doc.Plugins[0]["type"] != "bridge" || doc.Plugins[0]["bridge"] != "cni0" || doc.Plugins[1]["type"] != PluginType {
		t.Fatalf("converted conf: %s", out)
	}
	again, err := MergeConfig(out, entry)
	if err != nil || string(again) != string(out) {
		t.Errorf("merge is not idempotent:\n%s\n%s", out, again)
	}
	// Our entry moves to the end; unknown fields survive; removal works.
	list := `{"cniVersion":"1.0.0","name":"k8s","x-extra":1,"plugins":[{"type":"meshlet-cni","old":true},{"type":"calico"},{"type":"portmap"}]}`
	out, _ = MergeConfig([]byte(list), entry)
	if !strings.Contains(string(out), `"x-extra": 1`) || strings.Contains(string(out), `"old"`) ||
		strings.Index(string(out), "portmap") > strings.Index(string(out), PluginType) {
		t.Errorf("merge into conflist: %s", out)
	}
	out, _ = MergeConfig(out, nil)
	if strings.Contains(string(out), PluginType) {
		t.Errorf("removal left the entry: %s", out)
	}
	if _, err := MergeConfig([]byte(`{"name":"x"}`), entry); err == nil {
		t.Error("config without plugins/type accepted")
	}
}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestInstallerRun: install into a conf dir holding a single .conf, repair
// after the primary plugin rewrites it, remove everything on exit.
func TestInstallerRun(t *testing.T) {
	t.Parallel()
	confDir, binDir := t.TempDir(), t.TempDir()
	self := filepath.Join(t.TempDir(), "meshlet")
	writeFile(t, self, "#!/bin/sh\necho fake meshlet\n")
	writeFile(t, filepath.Join(confDir, "10-bridge.conf"), `{"cniVersion":"1.0.0","name":"pods","type":"bridge","bridge":"cni0"}`)
	writeFile(t, filepath.Join(confDir, "99-other.conflist"), `{"cniVersion":"1.0.0","name":"other","plugins":[{"type":"ptp"}]}`)
	excl := "3306"
	o := InstallOptions{ConfDir: confDir, BinDir: binDir, SelfBinary: self, Kubeconfig: []byte("kubeconfig-1\n"),
		Entry: PluginConf{LogLevel: "debug", Capture: CaptureDefaults{ExcludeInboundPorts: &excl}}}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- Run(ctx, o, nil) }()

	conflist := filepath.Join(confDir, "10-bridge.conflist")
	hasEntry := func() bool {
		b, err := os.ReadFile(conflist)
		return err == nil && strings.Contains(string(b), `"type": "meshlet-cni"`)
	}
	waitFor(t, "entry in the converted conflist", hasEntry)
	if _, err := os.Stat(filepath.Join(confDir, "10-bridge.conf")); !os.IsNotExist(err) {
		t.Errorf("the .conf was not replaced by the .conflist: %v", err)
	}
	b, _ := os.ReadFile(conflist)
	for _, w := range []string{`"kubeconfig": "` + filepath.Join(confDir, KubeconfigName) + `"`, `"excludeInboundPorts": "3306"`, `"logLevel": "debug"`, `"bridge": "cni0"`} {
		if !strings.Contains(string(b), w) {
			t.Errorf("conflist lacks %s:\n%s", w, b)
		}
	}
	if b, _ := os.ReadFile(filepath.Join(confDir, "99-other.conflist")); strings.Contains(string(b), PluginType) {
		t.Error("non-primary config was modified")
	}
	if b, err := os.ReadFile(filepath.Join(binDir, BinaryName)); err != nil || !strings.Contains(string(b), "fake meshlet") {
		t.Errorf("binary not installed: %v", err)
	}
	if target, err := os.Readlink(filepath.Join(binDir, PluginType)); err != nil || target != BinaryName {
		t.Errorf("%s links to %q (%v), want %q", PluginType, target, err, BinaryName)
	}
	if st, err := os.Stat(filepath.Join(confDir, KubeconfigName)); err != nil || st.Mode().Perm() != 0o600 {
		t.Errorf("kubeconfig: %v %v", st, err)
	}

	// The primary plugin rewrites its config without us.
	writeFile(t, conflist, `{"cniVersion":"1.0.0","name":"pods","plugins":[{"type":"bridge","bridge":"cni1"}]}`)
	waitFor(t, "repaired entry", func() bool {
		b, _ := os.ReadFile(conflist)
		return strings.Contains(string(b), "cni1") && strings.Contains(string(b), PluginType)
	})

	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
	b, _ = os.ReadFile(conflist)
	if strings.Contains(string(b), PluginType) || !strings.Contains(string(b), "cni1") {
		t.Errorf("after exit: %s", b)
	}
	for _, p := range []string{filepath.Join(confDir, KubeconfigName), filepath.Join(binDir, BinaryName), filepath.Join(binDir, PluginType)} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s not removed", p)
		}
	}
}

func TestInstallRejectsBadDefaults(t *testing.T) {
	t.Parallel()
	bad := "22,x"
	err := Install(InstallOptions{ConfDir: t.TempDir(), BinDir: t.TempDir(), Entry: PluginConf{Capture: CaptureDefaults{ExcludeInboundPorts: &bad}}})
	if err == nil || !strings.Contains(err.Error(), "capture.excludeInboundPorts") {
		t.Errorf("got %v", err)
	}
}

func TestInClusterKubeconfig(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "token"), "tok\n")
	writeFile(t, filepath.Join(dir, "ca.crt"), "-----BEGIN CERTIFICATE-----\n")
	b, err := InClusterKubeconfig(dir, "https://10.215.0.1:443")
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"server: https://10.215.0.1:443", "token: tok", "certificate-authority-data:"} {
		if !strings.Contains(string(b), w) {
			t.Errorf("kubeconfig lacks %q:\n%s", w, b)
		}
	}
}
