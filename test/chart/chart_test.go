package chart

import (
	"bytes"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"helm.sh/helm/v3/pkg/action"
	"helm.sh/helm/v3/pkg/lint/support"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/meshlet/meshlet/webhook/inject"
	"github.com/meshlet/meshlet/webhook/registration"
)

var update = flag.Bool("update", false, "rewrite the golden files and manifests/")

const chartDir = "../../charts/meshlet"

// custom is the non-default values case: CNI mode, cert-manager, tuned
// webhook and injection settings.
var custom = map[string]any{
	"image": map[string]any{"repository": "registry.example/meshlet", "tag": "1.2.3", "pullPolicy": "Always"},
	"webhook": map[string]any{
		"replicas": 3, "antiAffinity": "hard", "failurePolicy": "Ignore", "timeoutSeconds": 10,
		"excludedNamespaces": []any{"monitoring"}, "extraArgs": []any{"--some-flag=x"},
		"podDisruptionBudget": map[string]any{"enabled": true, "minAvailable": 2},
		"nodeSelector":        map[string]any{"kubernetes.io/os": "linux"},
	},
	"certManager": map[string]any{"enabled": true},
	"inject": map[string]any{
		"nativeSidecar": "false", "holdApplicationUntilProxyStarts": true, "terminationDrainDuration": "20s",
		"capture": map[string]any{"excludeInboundPorts": "22,8081", "excludeOutboundIPRanges": "169.254.169.254/32"},
	},
	"cni": map[string]any{"enabled": true, "binDir": "/usr/lib/cni", "confDir": "/etc/cni/conf.d"},
}

func golden(t *testing.T, path, got string) {
	t.Helper()
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test ./test/chart -update)", err)
	}
	if string(want) != got {
		t.Errorf("%s is stale; run go test ./test/chart -update and review the diff.\n--- got:\n%s", path, got)
	}
}

func TestGolden(t *testing.T) {
	for name, vals := range map[string]map[string]any{"default": nil, "custom": custom} {
		t.Run(name, func(t *testing.T) {
			got, err := Render(chartDir, vals)
			if err != nil {
				t.Fatal(err)
			}
			rest, _ := SplitIstioCRDs(got)
			golden(t, filepath.Join("testdata", name+".golden.yaml"), rest)
		})
	}
}

// TestManifestsUpToDate is the drift check of manifests/: it must equal the
// chart rendered with default values (`make manifests` regenerates it).
func TestManifestsUpToDate(t *testing.T) {
	files, err := Manifests(chartDir)
	if err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir("../../manifests")
	if err != nil && !*update {
		t.Fatal(err)
	}
	for _, e := range ents {
		if _, ok := files[e.Name()]; !ok {
			t.Errorf("manifests/%s is not generated from the chart; remove it", e.Name())
		}
	}
	for name, want := range files {
		p := filepath.Join("../../manifests", name)
		if *update {
			if err := os.WriteFile(p, []byte(want), 0o644); err != nil {
				t.Fatal(err)
			}
			continue
		}
		got, err := os.ReadFile(p)
		if err != nil || string(got) != want {
			t.Errorf("manifests/%s drifted from charts/meshlet; run make manifests", name)
		}
	}
}

// objects decodes a rendered manifest into its documents.
func objects(t *testing.T, manifest string) []map[string]any {
	t.Helper()
	var out []map[string]any
	d := utilyaml.NewYAMLOrJSONDecoder(strings.NewReader(manifest), 4096)
	for {
		var o map[string]any
		if err := d.Decode(&o); errors.Is(err, io.EOF) {
			return out
		} else if err != nil {
			t.Fatal(err)
		}
		if o != nil {
			out = append(out, o)
		}
	}
}

func find(t *testing.T, objs []map[string]any, kind, name string, into any) bool {
	t.Helper()
	for _, o := range objs {
		md, _ := o["metadata"].(map[string]any)
		if o["kind"] == kind && (name == "" || md["name"] == name) {
			b, err := yaml.Marshal(o)
			if err != nil {
				t.Fatal(err)
			}
			if err := yaml.UnmarshalStrict(b, into); err != nil {
				t.Fatalf("%s/%s: %v", kind, name, err)
			}
			return true
		}
	}
	return false
}

// TestInjectionConfigMap checks that the ConfigMap holds a document the
// injection core accepts, equal to the embedded defaults for default values,
// and that values reach it.
func TestInjectionConfigMap(t *testing.T) {
	for _, tc := range []struct {
		name  string
		vals  map[string]any
		check func(*testing.T, inject.Config)
	}{
		{"default", nil, func(t *testing.T, got inject.Config) {
			want := inject.DefaultConfig()
			gb, _ := yaml.Marshal(got)
			wb, _ := yaml.Marshal(want)
			if !bytes.Equal(gb, wb) {
				t.Errorf("default values give a config different from the embedded defaults:\n got: %s\nwant: %s", gb, wb)
			}
		}},
		{"custom", custom, func(t *testing.T, got inject.Config) {
			if got.Image != "registry.example/meshlet:1.2.3" || got.ImagePullPolicy != corev1.PullAlways ||
				!got.CNI.Enabled || got.NativeSidecar != inject.NativeSidecarFalse || !got.HoldApplicationUntilProxyStarts ||
				got.TerminationDrainDuration != "20s" || got.Capture.ExcludeInboundPorts != "22,8081" ||
				got.Capture.ExcludeOutboundIPRanges != "169.254.169.254/32" {
				t.Errorf("values did not reach the config: %+v", got)
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Render(chartDir, tc.vals)
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
			tc.check(t, cfg)
		})
	}
}

func TestWebhookDeployment(t *testing.T) {
	m, err := Render(chartDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	objs := objects(t, m)
	var d appsv1.Deployment
	if !find(t, objs, "Deployment", "meshlet-webhook", &d) {
		t.Fatal("no webhook Deployment")
	}
	if *d.Spec.Replicas != 2 {
		t.Errorf("replicas = %d, want 2", *d.Spec.Replicas)
	}
	c := d.Spec.Template.Spec.Containers[0]
	sc := c.SecurityContext
	if sc == nil || *sc.AllowPrivilegeEscalation || !*sc.ReadOnlyRootFilesystem || !*sc.RunAsNonRoot ||
		len(sc.Capabilities.Drop) != 1 || sc.Capabilities.Drop[0] != "ALL" || sc.SeccompProfile == nil {
		t.Errorf("webhook container is not restricted: %+v", sc)
	}
	if c.ReadinessProbe == nil || c.LivenessProbe == nil || c.Resources.Requests.Cpu().IsZero() || c.Resources.Limits.Memory().IsZero() {
		t.Error("webhook container lacks probes or resources")
	}
	if d.Spec.Template.Spec.Affinity == nil || d.Spec.Template.Spec.Affinity.PodAntiAffinity == nil {
		t.Error("webhook pods have no anti-affinity")
	}
	for _, kind := range []string{"PodDisruptionBudget", "Service", "ServiceAccount", "ClusterRole", "Role", "MutatingWebhookConfiguration", "Secret"} {
		var o map[string]any
		if !find(t, objs, kind, "", &o) {
			t.Errorf("no %s rendered", kind)
		}
	}
	for _, kind := range []string{"DaemonSet", "Certificate", "Issuer"} {
		var o map[string]any
		if find(t, objs, kind, "", &o) {
			t.Errorf("%s rendered with default values", kind)
		}
	}
}

func TestLint(t *testing.T) {
	for name, vals := range map[string]map[string]any{"default": nil, "custom": custom} {
		t.Run(name, func(t *testing.T) {
			lint := action.NewLint()
			lint.Strict = true
			if vals == nil {
				vals = map[string]any{}
			}
			res := lint.Run([]string{chartDir}, vals)
			for _, m := range res.Messages {
				if m.Severity > support.InfoSev {
					t.Errorf("helm lint: %s", m)
				}
			}
			for _, err := range res.Errors {
				t.Errorf("helm lint: %v", err)
			}
		})
	}
}

// TestSchemaRejects checks that values.schema.json names the bad key.
func TestSchemaRejects(t *testing.T) {
	for _, tc := range []struct {
		vals map[string]any
		want string
	}{
		{map[string]any{"webhook": map[string]any{"replicas": 0}}, "replicas"},
		{map[string]any{"webhook": map[string]any{"failurePolicy": "Sometimes"}}, "failurePolicy"},
		{map[string]any{"image": map[string]any{"pullPolicy": "Maybe"}}, "pullPolicy"},
		{map[string]any{"inject": map[string]any{"nativeSidecar": "yes"}}, "nativeSidecar"},
		{map[string]any{"inject": map[string]any{"terminationDrainDuration": "soon"}}, "terminationDrainDuration"},
		{map[string]any{"inject": map[string]any{"capture": map[string]any{"excludeInboundPorts": "ssh"}}}, "excludeInboundPorts"},
		{map[string]any{"webhook": map[string]any{"replica": 2}}, "replica"},
		{map[string]any{"cni": map[string]any{"binDir": "relative"}}, "binDir"},
		{map[string]any{"inject": map[string]any{"caAddress": "istiod"}}, "caAddress"},
		{map[string]any{"inject": map[string]any{"discoveryAddress": "istiod.x.svc"}}, "discoveryAddress"},
	} {
		_, err := Render(chartDir, tc.vals)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("values %v: err = %v, want one naming %q", tc.vals, err, tc.want)
		}
	}
}

func TestNotesTellTheNextCommand(t *testing.T) {
	notes, err := Notes(chartDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"kubectl label namespace NAMESPACE istio-injection=enabled", "rollout status deployment/meshlet-webhook", "-n meshlet-system"} {
		if !strings.Contains(notes, want) {
			t.Errorf("NOTES.txt lacks %q:\n%s", want, notes)
		}
	}
}

// TestMutatingWebhookConfigurationMatchesBuilder checks that the chart
// templates the MutatingWebhookConfiguration exactly as the webhook's Go
// builder (webhook/registration) shapes it, labels aside.
func TestMutatingWebhookConfigurationMatchesBuilder(t *testing.T) {
	for name, tc := range map[string]struct {
		vals map[string]any
		opts registration.Options
	}{
		"default": {nil, registration.Options{Namespace: Namespace, ServiceName: "meshlet-webhook"}},
		"custom": {custom, registration.Options{Namespace: Namespace, ServiceName: "meshlet-webhook",
			TimeoutSeconds: 10, ExcludedNamespaces: []string{"monitoring"}}},
	} {
		t.Run(name, func(t *testing.T) {
			m, err := Render(chartDir, tc.vals)
			if err != nil {
				t.Fatal(err)
			}
			var got admissionregistrationv1.MutatingWebhookConfiguration
			if !find(t, objects(t, m), "MutatingWebhookConfiguration", "meshlet-sidecar-injector", &got) {
				t.Fatal("no MutatingWebhookConfiguration meshlet-sidecar-injector")
			}
			want := registration.Build(tc.opts)
			if name == "custom" {
				// failurePolicy is a chart value (Ignore here); the builder always says Fail.
				ignore := admissionregistrationv1.Ignore
				for i := range want.Webhooks {
					want.Webhooks[i].FailurePolicy = &ignore
				}
			}
			got.Labels, got.Annotations = nil, nil
			gb, _ := yaml.Marshal(got)
			wb, _ := yaml.Marshal(want)
			if !bytes.Equal(gb, wb) {
				t.Errorf("chart MutatingWebhookConfiguration differs from registration.Build:\n--- chart:\n%s\n--- builder:\n%s", gb, wb)
			}
		})
	}
}
