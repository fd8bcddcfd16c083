package translate

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// testProxyName names the ConfigMap a case uses to describe its proxy:
// data ip, name, namespace, generator, labels ("k=v,k=v").
const testProxyName = "meshlet-test-proxy"

func loadCase(t *testing.T, path string) (*Inputs, Proxy) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.HasPrefix(data, []byte("# no-base")) {
		base, err := os.ReadFile("testdata/base.yaml")
		if err != nil {
			t.Fatal(err)
		}
		data = append(append(base, []byte("\n---\n")...), data...)
	}
	objs, err := DecodeYAML(data)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	in := &Inputs{RootNamespace: "istio-system"}
	p := Proxy{IP: "10.0.0.100", Name: "sleep", Namespace: "shop"}
	for _, o := range in.AddObjects(objs...) {
		cm, ok := o.(*corev1.ConfigMap)
		if !ok || cm.Name != testProxyName {
			t.Fatalf("%s: unexpected object %T", path, o)
		}
		d := cm.Data
		p.IP, p.Name, p.Namespace, p.Generator = or(d["ip"], p.IP), or(d["name"], p.Name), or(d["namespace"], p.Namespace), d["generator"]
		if d["labels"] != "" {
			p.Labels = map[string]string{}
			for _, kv := range strings.Split(d["labels"], ",") {
				k, v, _ := strings.Cut(kv, "=")
				p.Labels[k] = v
			}
		}
	}
	p.ID = NodeID(p.IP, p.Name, p.Namespace, "")
	return in, p
}

func or(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// render is the golden form: warnings, then every resource as protojson,
// re-indented by encoding/json so the bytes are stable.
func render(t *testing.T, m *Mesh, r *Resources) []byte {
	t.Helper()
	list := func(msgs []proto.Message) []json.RawMessage {
		out := []json.RawMessage{}
		for _, msg := range msgs {
			b, err := protojson.Marshal(msg)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, b)
		}
		return out
	}
	var warnings []string
	for _, w := range m.Warnings() {
		warnings = append(warnings, w.String())
	}
	doc := map[string]any{
		"warnings":  warnings,
		"listeners": list(msgs(r.Listeners)),
		"routes":    list(msgs(r.Routes)),
		"clusters":  list(msgs(r.Clusters)),
		"endpoints": list(msgs(r.Endpoints)),
	}
	b, err := json.Marshal(doc)
	if err != nil {
		t.Fatal(err)
	}
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatal(err)
	}
	out, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return append(out, '\n')
}

func msgs[T proto.Message](in []T) []proto.Message {
	out := make([]proto.Message, len(in))
	for i, m := range in {
		out[i] = m
	}
	return out
}

// TestGolden translates every testdata/cases/*.yaml (Istio YAML plus the
// base objects) and compares the warnings and resources with
// testdata/golden/NAME.json. Regenerate with -update.
func TestGolden(t *testing.T) {
	cases, err := filepath.Glob("testdata/cases/*.yaml")
	if err != nil || len(cases) < 30 {
		t.Fatalf("want at least 30 cases, have %d (%v)", len(cases), err)
	}
	for _, c := range cases {
		name := strings.TrimSuffix(filepath.Base(c), ".yaml")
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			in, p := loadCase(t, c)
			m := Compile(in)
			res := m.ForProxy(p)
			validateAll(t, res)
			got := render(t, m, res)
			golden := filepath.Join("testdata/golden", name+".json")
			if *update {
				if err := os.WriteFile(golden, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update)", err)
			}
			if !bytes.Equal(got, want) {
				t.Errorf("%s differs from the translation (run with -update to accept):\n%s", golden, diffLines(string(want), string(got)))
			}
		})
	}
}

// diffLines shows the first differing lines.
func diffLines(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := 0; i < len(w) || i < len(g); i++ {
		var a, b string
		if i < len(w) {
			a = w[i]
		}
		if i < len(g) {
			b = g[i]
		}
		if a != b {
			lo := max(0, i-3)
			return "line " + itoa(i+1) + ":\n- " + a + "\n+ " + b + "\n(context from got)\n" + strings.Join(g[lo:min(len(g), i+4)], "\n")
		}
	}
	return "(identical lines, different bytes)"
}

func itoa(i int) string { b, _ := json.Marshal(i); return string(b) }

// validateAll runs Envoy's own field constraints (protoc-gen-validate) over
// every resource and checks that every cluster, EDS name and route name a
// resource refers to is in the set.
func validateAll(t *testing.T, r *Resources) {
	t.Helper()
	type validator interface{ ValidateAll() error }
	for _, m := range append(append(append(msgs(r.Listeners), msgs(r.Routes)...), msgs(r.Clusters)...), msgs(r.Endpoints)...) {
		if err := m.(validator).ValidateAll(); err != nil {
			t.Errorf("%T is not valid Envoy config: %v", m, err)
		}
	}
	clusters := map[string]bool{}
	eds := map[string]bool{}
	for _, c := range r.Clusters {
		clusters[c.Name] = true
		if c.GetType().String() == "EDS" {
			eds[c.GetEdsClusterConfig().GetServiceName()] = true
		}
	}
	for _, e := range r.Endpoints {
		if !eds[e.ClusterName] {
			t.Errorf("ClusterLoadAssignment %s has no EDS cluster", e.ClusterName)
		}
		delete(eds, e.ClusterName)
	}
	for n := range eds {
		t.Errorf("EDS cluster %s has no ClusterLoadAssignment", n)
	}
	routes := map[string]bool{}
	for _, rc := range r.Routes {
		routes[rc.Name] = true
		for _, vh := range rc.VirtualHosts {
			for _, rt := range vh.Routes {
				a := rt.GetRoute()
				if a == nil {
					continue
				}
				names := []string{a.GetCluster()}
				for _, w := range a.GetWeightedClusters().GetClusters() {
					names = append(names, w.Name)
				}
				for _, mp := range a.GetRequestMirrorPolicies() {
					names = append(names, mp.Cluster)
				}
				for _, n := range names {
					if n != "" && !clusters[n] {
						t.Errorf("route %s/%s names cluster %s, which is not sent", rc.Name, rt.Name, n)
					}
				}
			}
		}
	}
	for _, l := range r.Listeners {
		raw, _ := protojson.Marshal(l)
		var b bytes.Buffer
		if err := json.Compact(&b, raw); err != nil {
			t.Fatal(err)
		}
		for _, part := range strings.Split(b.String(), `"routeConfigName":"`)[1:] {
			name, _, _ := strings.Cut(part, `"`)
			if !routes[name] {
				t.Errorf("listener %s names route configuration %s, which is not sent", l.Name, name)
			}
		}
	}
}
