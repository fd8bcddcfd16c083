package registration

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"sigs.k8s.io/yaml"
)

var update = flag.Bool("update", false, "rewrite golden files")

func TestBuildGolden(t *testing.T) {
	t.Parallel()
	cfg := Build(Options{
		Namespace:   "meshlet-system",
		ServiceName: "meshlet-webhook",
		Labels:      map[string]string{"app.kubernetes.io/name": "meshlet", "app.kubernetes.io/component": "webhook"},
	})
	got, err := yaml.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	golden := filepath.Join("testdata", "mutatingwebhookconfiguration.golden.yaml")
	if *update {
		if err := os.WriteFile(golden, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(golden)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("Build output differs from %s (run with -update if intended):\n%s", golden, got)
	}
}

// TestSelectors checks which namespace/pod label sets each webhook matches,
// the way the API server evaluates the selectors.
func TestSelectors(t *testing.T) {
	t.Parallel()
	cfg := Build(Options{Namespace: "meshlet-system", ServiceName: "meshlet-webhook"})
	sel := func(ls *metav1.LabelSelector) labels.Selector {
		s, err := metav1.LabelSelectorAsSelector(ls)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	ns := func(name string, l map[string]string) labels.Set {
		out := labels.Set{MetadataNameLabel: name}
		for k, v := range l {
			out[k] = v
		}
		return out
	}
	enabled := map[string]string{NamespaceLabel: "enabled"}
	tests := []struct {
		name string
		ns   labels.Set
		pod  labels.Set
		want bool // called by at least one webhook
	}{
		{"labelled namespace", ns("apps", enabled), nil, true},
		{"labelled namespace, pod opted out", ns("apps", enabled), labels.Set{PodLabel: "false"}, false},
		{"labelled namespace, pod opted in", ns("apps", enabled), labels.Set{PodLabel: "true"}, true},
		{"plain namespace", ns("apps", nil), nil, false},
		{"plain namespace, pod opted in", ns("apps", nil), labels.Set{PodLabel: "true"}, true},
		{"disabled namespace, pod opted in", ns("apps", map[string]string{NamespaceLabel: "disabled"}), labels.Set{PodLabel: "true"}, false},
		{"kube-system labelled", ns("kube-system", enabled), nil, false},
		{"kube-public, pod opted in", ns("kube-public", nil), labels.Set{PodLabel: "true"}, false},
		{"own namespace labelled", ns("meshlet-system", enabled), labels.Set{PodLabel: "true"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			calls := 0
			for _, wh := range cfg.Webhooks {
				if sel(wh.NamespaceSelector).Matches(tt.ns) && sel(wh.ObjectSelector).Matches(tt.pod) {
					calls++
				}
			}
			if calls > 1 {
				t.Fatalf("pod matched %d webhooks; want at most one (double injection round-trip)", calls)
			}
			if got := calls == 1; got != tt.want {
				t.Errorf("matched = %v, want %v", got, tt.want)
			}
		})
	}
}
