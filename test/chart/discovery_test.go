package chart

import (
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	rbacv1 "k8s.io/api/rbac/v1"

	"github.com/meshlet/meshlet/webhook/inject"
)

// TestIstioCRDsFromModule is the drift check of the chart's Istio CRDs: a
// byte-for-byte copy of the istio.io/api module's file (copy it again after
// bumping the module), rendered by default and left out with
// discovery.installIstioCRDs=false.
func TestIstioCRDsFromModule(t *testing.T) {
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatalf("go list -m istio.io/api: %v", err)
	}
	src := filepath.Join(strings.TrimSpace(string(out)), "kubernetes", "customresourcedefinitions.gen.yaml")
	want, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile(filepath.Join(chartDir, "files", "istio-crds.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if string(got) != string(want) {
		t.Fatalf("charts/meshlet/files/istio-crds.yaml differs from %s: cp it over (and run make manifests)", src)
	}
	for _, tc := range []struct {
		vals map[string]any
		want int
	}{{nil, 15}, {map[string]any{"discovery": map[string]any{"installIstioCRDs": false}}, 0}} {
		m, err := Render(chartDir, tc.vals)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, o := range objects(t, m) {
			if o["kind"] == "CustomResourceDefinition" {
				n++
			}
		}
		if n != tc.want {
			t.Errorf("values %v: %d CRDs rendered, want %d", tc.vals, n, tc.want)
		}
	}
}

// TestDiscoveryFromOneKey: inject.discoveryAddress names the address the
// injected gRPC bootstrap uses, the discovery Service and its xDS port, and
// the port the discovery pods listen on; the defaults are istiod's.
func TestDiscoveryFromOneKey(t *testing.T) {
	for _, tc := range []struct {
		name, addr, svc string
		port            int32
		vals            map[string]any
	}{
		{"default", "istiod.meshlet-system.svc:15010", "istiod", 15010, nil},
		{"custom", "mesh-cp.meshlet-system.svc:15999", "mesh-cp", 15999,
			map[string]any{"inject": map[string]any{"discoveryAddress": "mesh-cp.meshlet-system.svc:15999"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Render(chartDir, tc.vals)
			if err != nil {
				t.Fatal(err)
			}
			objs := objects(t, m)
			var cm corev1.ConfigMap
			if !find(t, objs, "ConfigMap", "meshlet-injection", &cm) {
				t.Fatal("no injection ConfigMap")
			}
			cfg, err := inject.LoadConfig([]byte(cm.Data["config.yaml"]))
			if err != nil {
				t.Fatal(err)
			}
			if cfg.DiscoveryAddress != tc.addr {
				t.Errorf("injection discoveryAddress %q, want %q", cfg.DiscoveryAddress, tc.addr)
			}
			var svc corev1.Service
			if !find(t, objs, "Service", tc.svc, &svc) {
				t.Fatalf("no discovery Service %q", tc.svc)
			}
			if svc.Spec.Ports[0].Name != "grpc-xds" || svc.Spec.Ports[0].Port != tc.port {
				t.Errorf("Service %s ports %+v, want grpc-xds %d", tc.svc, svc.Spec.Ports, tc.port)
			}
			var dep appsv1.Deployment
			if !find(t, objs, "Deployment", "meshlet-discovery", &dep) {
				t.Fatal("no Deployment meshlet-discovery")
			}
			c := dep.Spec.Template.Spec.Containers[0]
			if !slices.Contains(c.Args, "--xds-addr=:"+itoa(tc.port)) || c.Ports[0].ContainerPort != tc.port {
				t.Errorf("discovery pods do not listen on %d: args %v ports %+v", tc.port, c.Args, c.Ports)
			}
			if *dep.Spec.Replicas < 2 {
				t.Errorf("%d discovery replicas, want at least 2", *dep.Spec.Replicas)
			}
			var pdb policyv1.PodDisruptionBudget
			if !find(t, objs, "PodDisruptionBudget", "meshlet-discovery", &pdb) {
				t.Error("no PodDisruptionBudget for discovery")
			}
		})
	}
}

// TestDiscoveryLeastRBAC: the control plane may list and watch what it
// reads and create Events, nothing else.
func TestDiscoveryLeastRBAC(t *testing.T) {
	m, err := Render(chartDir, nil)
	if err != nil {
		t.Fatal(err)
	}
	var cr rbacv1.ClusterRole
	if !find(t, objects(t, m), "ClusterRole", "meshlet-discovery", &cr) {
		t.Fatal("no ClusterRole meshlet-discovery")
	}
	allowed := map[string][]string{
		"/services": {"list", "watch"}, "/pods": {"list", "watch"}, "/namespaces": {"list", "watch"},
		"discovery.k8s.io/endpointslices":     {"list", "watch"},
		"networking.istio.io/virtualservices": {"list", "watch"}, "networking.istio.io/destinationrules": {"list", "watch"},
		"networking.istio.io/serviceentries": {"list", "watch"}, "networking.istio.io/sidecars": {"list", "watch"},
		"security.istio.io/authorizationpolicies": {"list", "watch"}, "security.istio.io/peerauthentications": {"list", "watch"},
		"/events": {"create", "patch"},
	}
	seen := map[string]bool{}
	for _, r := range cr.Rules {
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				key := g + "/" + res
				want, ok := allowed[key]
				if !ok || !slices.Equal(slices.Sorted(slices.Values(r.Verbs)), want) || len(r.ResourceNames) > 0 {
					t.Errorf("rule %s %v is more than the control plane needs", key, r.Verbs)
				}
				seen[key] = true
			}
		}
	}
	for k := range allowed {
		if !seen[k] {
			t.Errorf("no rule for %s: the informers or Events would be forbidden", k)
		}
	}
}

func itoa(n int32) string { return strconv.Itoa(int(n)) }

// TestInjectedAddresses: the injection config gives the sidecars the chart's
// discovery Service and CA by default, the values' addresses when set, and
// none (static sidecars, no CA) when the chart runs no control plane.
func TestInjectedAddresses(t *testing.T) {
	for _, tc := range []struct {
		name, discovery, ca string
		vals                map[string]any
	}{
		{"default", "istiod.meshlet-system.svc:15010", "istiod.meshlet-system.svc:15012", nil},
		{"custom discovery", "mesh-cp.meshlet-system.svc:15999", "mesh-cp.meshlet-system.svc:15012",
			map[string]any{"inject": map[string]any{"discoveryAddress": "mesh-cp.meshlet-system.svc:15999"}}},
		{"custom CA port", "istiod.meshlet-system.svc:15010", "istiod.meshlet-system.svc:16012",
			map[string]any{"discovery": map[string]any{"ca": map[string]any{"port": 16012}}}},
		{"explicit CA", "istiod.meshlet-system.svc:15010", "ca.example.svc:443",
			map[string]any{"inject": map[string]any{"caAddress": "ca.example.svc:443"}}},
		{"no CA", "istiod.meshlet-system.svc:15010", "",
			map[string]any{"discovery": map[string]any{"ca": map[string]any{"enabled": false}}}},
		{"no control plane", "", "",
			map[string]any{"discovery": map[string]any{"enabled": false}}},
		{"external control plane", "istiod.istio-system.svc:15010", "istiod.istio-system.svc:15012",
			map[string]any{"discovery": map[string]any{"enabled": false},
				"inject": map[string]any{"discoveryAddress": "istiod.istio-system.svc:15010", "caAddress": "istiod.istio-system.svc:15012"}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := Render(chartDir, tc.vals)
			if err != nil {
				t.Fatal(err)
			}
			var cm corev1.ConfigMap
			if !find(t, objects(t, m), "ConfigMap", "meshlet-injection", &cm) {
				t.Fatal("no injection ConfigMap")
			}
			cfg, err := inject.LoadConfig([]byte(cm.Data["config.yaml"]))
			if err != nil {
				t.Fatal(err)
			}
			if cfg.DiscoveryAddress != tc.discovery || cfg.CAAddress != tc.ca {
				t.Errorf("discoveryAddress %q caAddress %q, want %q %q", cfg.DiscoveryAddress, cfg.CAAddress, tc.discovery, tc.ca)
			}
		})
	}
}
