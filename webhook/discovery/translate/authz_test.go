package translate

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
)

// loadSecurityCase reads a testdata/authz case: security objects plus an
// optional meshlet-test-proxy ConfigMap (namespace, labels "k=v,k=v").
// The default proxy is reviews-v1-a in shop, labels app=reviews,version=v1.
func loadSecurityCase(t *testing.T, path string) (*SecurityInputs, Proxy) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	objs, err := DecodeYAML(data)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	in := &SecurityInputs{}
	p := Proxy{IP: "10.1.0.1", Name: "reviews-v1-a", Namespace: "shop", Labels: map[string]string{"app": "reviews", "version": "v1"}}
	for _, o := range in.AddObjects(objs...) {
		cm, ok := o.(*corev1.ConfigMap)
		if !ok || cm.Name != testProxyName {
			t.Fatalf("%s: unexpected object %T", path, o)
		}
		p.Namespace = or(cm.Data["namespace"], p.Namespace)
		if l := cm.Data["labels"]; l != "" {
			p.Labels = map[string]string{}
			for _, kv := range strings.Split(l, ",") {
				k, v, _ := strings.Cut(kv, "=")
				p.Labels[k] = v
			}
		}
	}
	p.ID = NodeID(p.IP, p.Name, p.Namespace, "")
	return in, p
}

// renderSecurity is the golden form of one proxy's security configuration.
func renderSecurity(t *testing.T, m *SecurityMesh, s *Security) []byte {
	t.Helper()
	list := func(ms []proto.Message) []json.RawMessage {
		out := []json.RawMessage{}
		for _, msg := range ms {
			if err := msg.(interface{ ValidateAll() error }).ValidateAll(); err != nil {
				t.Errorf("%T is not valid Envoy config: %v", msg, err)
			}
			b, err := protojson.Marshal(msg)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, b)
		}
		return out
	}
	warnings := []string{}
	for _, w := range m.Warnings() {
		warnings = append(warnings, w.String())
	}
	ports := map[string]string{}
	for p, md := range s.Ports {
		ports[itoa(int(p))] = string(md)
	}
	doc := map[string]any{
		"warnings":       warnings,
		"httpFilters":    list(msgs(s.HTTPFilters())),
		"networkFilters": list(msgs(s.NetworkFilters())),
		"mtlsMode":       s.Mode,
		"mtlsPorts":      ports,
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

// TestSecurityGolden translates every testdata/authz/cases/*.yaml for its
// proxy and compares warnings, RBAC filters and mTLS modes with
// testdata/authz/golden/NAME.json. Regenerate with -update.
func TestSecurityGolden(t *testing.T) {
	cases, err := filepath.Glob("testdata/authz/cases/*.yaml")
	if err != nil || len(cases) < 15 {
		t.Fatalf("want at least 15 cases, have %d (%v)", len(cases), err)
	}
	for _, c := range cases {
		name := strings.TrimSuffix(filepath.Base(c), ".yaml")
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			in, p := loadSecurityCase(t, c)
			m := CompileSecurity(in)
			got := renderSecurity(t, m, m.ForProxy(p))
			golden := filepath.Join("testdata/authz/golden", name+".json")
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
