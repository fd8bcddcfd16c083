package xds

import (
	"os"
	"testing"

	"github.com/meshlet/meshlet/webhook/discovery/translate"
)

// translateCase compiles a translate golden case (with its base objects)
// for the proxy the case's ConfigMap names.
func translateCase(t *testing.T, name string) *translate.Resources {
	t.Helper()
	var yaml []byte
	for _, f := range []string{"../../webhook/discovery/translate/testdata/base.yaml", "../../webhook/discovery/translate/testdata/cases/" + name + ".yaml"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		yaml = append(append(yaml, b...), "\n---\n"...)
	}
	objs, err := translate.DecodeYAML(yaml)
	if err != nil {
		t.Fatal(err)
	}
	in := &translate.Inputs{}
	in.AddObjects(objs...)
	m := translate.Compile(in)
	if w := m.Warnings(); len(w) > 0 {
		t.Fatalf("translation warnings: %v", w)
	}
	return m.ForProxy(translate.Proxy{ID: translate.NodeID("10.1.0.5", "details-a", "shop", ""), IP: "10.1.0.5", Name: "details-a", Namespace: "shop", Labels: map[string]string{"app": "details"}})
}

// TestDecodeTranslatedMTLS: the translation's automatic mutual TLS and
// PeerAuthentication chains decode into the engine's fields: a cluster of
// ISTIO_MUTUAL with autoMTLS and the service accounts' SPIFFE IDs, the
// meshed endpoint's tlsMode, and per-port modes (9080 STRICT, the rest
// PERMISSIVE).
func TestDecodeTranslatedMTLS(t *testing.T) {
	r := translateCase(t, "auto-mtls")
	const name = "outbound|9080||details.shop.svc.cluster.local"
	var found bool
	for _, c := range r.Clusters {
		info, err := decodeCluster(c)
		if err != nil {
			t.Fatalf("cluster %s: %v", c.GetName(), err)
		}
		if c.GetName() != name {
			continue
		}
		found = true
		tl := info.cfg.TLS
		if tl == nil || tl.Mode != "ISTIO_MUTUAL" || !tl.AutoMTLS || len(tl.SubjectAltNames) != 1 || tl.SubjectAltNames[0] != "spiffe://cluster.local/ns/shop/sa/details" || tl.SNI != "outbound_.9080_._.details.shop.svc.cluster.local" {
			t.Fatalf("cluster %s TLS = %+v", name, tl)
		}
	}
	if !found {
		t.Fatalf("no cluster %s", name)
	}
	for _, cla := range r.Endpoints {
		if cla.GetClusterName() != name {
			continue
		}
		eps, err := decodeEndpoints(cla)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]string{}
		for _, e := range eps {
			got[e.Address] = e.TLSMode
		}
		if got["10.1.0.5:9080"] != "istio" || got["10.1.0.6:9080"] != "" {
			t.Fatalf("endpoint tlsModes %v", got)
		}
	}
	for _, l := range r.Listeners {
		info, err := decodeListener(l)
		if err != nil {
			t.Fatalf("listener %s: %v", l.GetName(), err)
		}
		if l.GetName() != translate.VirtualInbound {
			continue
		}
		m := info.mtls
		if m == nil || m.Mode != "PERMISSIVE" || m.Ports[9080] != "STRICT" || m.Ports[5432] != "PERMISSIVE" {
			t.Fatalf("inbound mtls = %+v", m)
		}
		// The STRICT port's plain-text black hole has no rules of its own:
		// the mutual TLS chain's rules decide.
		if info.authz.tcp[9080] != nil {
			t.Fatal("the black-hole chain compiled connection rules for 9080")
		}
	}
}
