package agent_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// TestBadUpstreamTLSKeepsServing: an l7 cluster whose TLS files are bad
// (a CA file that holds no certificate, a client key that is missing) is
// rejected at reload with every field and path named, and the running
// generation keeps serving.
func TestBadUpstreamTLSKeepsServing(t *testing.T) {
	p := startAgent(t, httpBackend(t))
	gen := p.info(t).ActiveGeneration
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(ca, []byte("not a certificate\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	key := filepath.Join(dir, "missing-key.pem")
	cfg := fmt.Sprintf(`apiVersion: meshlet.io/v1alpha1
kind: ProxyConfig
l7:
  clusters:
  - name: api
    endpoints: [{address: "127.0.0.1:8443"}]
    tls: {mode: MUTUAL, caCertificates: %q, clientCertificate: %q, privateKey: %q}
`, ca, ca, key)
	if err := os.WriteFile(p.configPath, []byte(cfg), 0o644); err != nil {
		t.Fatal(err)
	}
	r := p.reload(t)
	for _, want := range []string{"l7.clusters[0].tls.caCertificates", ca, "l7.clusters[0].tls.privateKey", key} {
		if !strings.Contains(r.Error, want) {
			t.Errorf("reload error does not name %q: %q", want, r.Error)
		}
	}
	if err := get(p.outbound); err != nil {
		t.Errorf("old generation stopped serving: %v", err)
	}
	if g := p.info(t).ActiveGeneration; g != gen {
		t.Errorf("active generation changed %d → %d", gen, g)
	}
}
