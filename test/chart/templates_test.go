package chart

import (
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/meshlet/meshlet/webhook/inject"
)

// TestInjectionTemplatesFromValues: templates and the discovery address in
// values reach the injection config, added to the built-in templates, and an
// unknown default template is refused by the injection core.
func TestInjectionTemplatesFromValues(t *testing.T) {
	vals := map[string]any{"inject": map[string]any{
		"discoveryAddress": "discovery.mesh.svc:15010",
		"templates": map[string]any{"spire": map[string]any{
			"volumes": []any{map[string]any{"name": "spire", "csi": map[string]any{"driver": "csi.spiffe.io"}}},
		}},
	}}
	m, err := Render(chartDir, vals)
	if err != nil {
		t.Fatal(err)
	}
	var cm corev1.ConfigMap
	if !find(t, objects(t, m), "ConfigMap", "meshlet-injection", &cm) {
		t.Fatal("no ConfigMap meshlet-injection")
	}
	cfg, err := inject.LoadConfig([]byte(cm.Data["config.yaml"]))
	if err != nil {
		t.Fatalf("the injection core rejects the chart's config: %v\n%s", err, cm.Data["config.yaml"])
	}
	if cfg.DiscoveryAddress != "discovery.mesh.svc:15010" {
		t.Errorf("discoveryAddress = %q", cfg.DiscoveryAddress)
	}
	for _, n := range []string{"sidecar", "gateway", "grpc-agent", "grpc-simple", "spire"} {
		if _, ok := cfg.Templates[n]; !ok {
			t.Errorf("template %s missing: %v", n, cfg.Templates)
		}
	}
	if v := cfg.Templates["spire"].Volumes; len(v) != 1 || v[0].CSI == nil || v[0].CSI.Driver != "csi.spiffe.io" {
		t.Errorf("template spire volumes = %+v", v)
	}

	m, err = Render(chartDir, map[string]any{"inject": map[string]any{"defaultTemplates": []any{"sidecr"}}})
	if err != nil {
		t.Fatal(err)
	}
	if !find(t, objects(t, m), "ConfigMap", "meshlet-injection", &cm) {
		t.Fatal("no ConfigMap meshlet-injection")
	}
	if _, err := inject.LoadConfig([]byte(cm.Data["config.yaml"])); err == nil {
		t.Error("defaultTemplates [sidecr] accepted")
	}
}
