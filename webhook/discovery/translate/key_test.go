package translate

import (
	"bytes"
	"maps"
	"path/filepath"
	"testing"
)

// otherLabels returns lbls with every label no selector of m reads changed
// (value suffixed) and one more such label added; the labels selectors read
// are kept.
func otherLabels(m *Mesh, lbls map[string]string) map[string]string {
	out := maps.Clone(lbls)
	if out == nil {
		out = map[string]string{}
	}
	for k, v := range out {
		if !m.labelKeys[k] {
			out[k] = v + "-other"
		}
	}
	out["pod-template-hash"] = "meshlet-test"
	return out
}

// TestKeyIgnoresUnselectedLabels: for every golden case (translation and
// security), a proxy whose labels differ only in keys no selector of the
// mesh reads has the same Key and gets the same resources. This is what
// lets the server build once for all of a namespace's workloads that no
// selector tells apart; a selector ForProxy evaluates but selectorKeys does
// not list fails here (for the cases that exercise it).
func TestKeyIgnoresUnselectedLabels(t *testing.T) {
	cases, _ := filepath.Glob("testdata/cases/*.yaml")
	for _, c := range cases {
		t.Run(filepath.Base(c), func(t *testing.T) {
			in, p := loadCase(t, c)
			m := Compile(in)
			// A proxy no pod describes: its labels are its node metadata's.
			p.Labels, p.Name = m.proxyLabels(&p), "meshlet-test-no-pod"
			q := p
			q.Labels = otherLabels(m, p.Labels)
			if m.Key(p) != m.Key(q) {
				t.Fatalf("labels %v and %v (selectors read %v) have different keys", p.Labels, q.Labels, m.labelKeys)
			}
			if a, b := render(t, m, m.ForProxy(p)), render(t, m, m.ForProxy(q)); !bytes.Equal(a, b) {
				t.Fatalf("labels %v and %v have one key but different resources:\n%s", p.Labels, q.Labels, diffLines(string(a), string(b)))
			}
		})
	}
	security, _ := filepath.Glob("testdata/authz/cases/*.yaml")
	for _, c := range security {
		t.Run("authz/"+filepath.Base(c), func(t *testing.T) {
			sec, p := loadSecurityCase(t, c)
			m := Compile(&Inputs{Security: *sec})
			q := p
			q.Labels = otherLabels(m, p.Labels)
			if m.Key(p) != m.Key(q) {
				t.Fatalf("labels %v and %v (selectors read %v) have different keys", p.Labels, q.Labels, m.labelKeys)
			}
			if a, b := renderSecurity(t, m.security, m.security.ForProxy(p)), renderSecurity(t, m.security, m.security.ForProxy(q)); !bytes.Equal(a, b) {
				t.Fatalf("labels %v and %v have one key but different security configuration:\n%s", p.Labels, q.Labels, diffLines(string(a), string(b)))
			}
		})
	}
}
