package agent_test

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/agent"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/webhook/certs"
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

// newCAPEM returns a fresh self-signed CA certificate (PEM).
func newCAPEM(t *testing.T) []byte {
	t.Helper()
	_, certPEM, _, err := certs.NewAuthority(time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return certPEM
}

// newKeyPair returns a CA certificate and a client certificate and key it
// issued (PEM).
func newKeyPair(t *testing.T) (caPEM, certPEM, keyPEM []byte) {
	t.Helper()
	ca, caPEM, _, err := certs.NewAuthority(time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err = ca.Issue(time.Now(), time.Hour, []string{"client.test"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return caPEM, certPEM, keyPEM
}

func writeFile(t testing.TB, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// tlsClusterConfig is a proxy config with one l7 cluster originating TLS
// with the given tls block.
func tlsClusterConfig(tlsBlock string) []byte {
	return []byte(`apiVersion: meshlet.io/v1alpha1
kind: ProxyConfig
l7:
  clusters:
  - name: api
    endpoints: [{address: "127.0.0.1:8443"}]
    tls: ` + tlsBlock + "\n")
}

// configHash is the hash the agent computes for doc with the referenced
// files as they are now.
func configHash(t testing.TB, doc []byte) string {
	t.Helper()
	l, err := config.Parse(doc)
	if err != nil {
		t.Fatal(err)
	}
	return l.Hash
}

// waitInfo polls the agent's /server_info until ok holds, for up to 20s.
func (p *proc) waitInfo(t testing.TB, what string, ok func(agent.Info) bool) agent.Info {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		i := p.info(t)
		if ok(i) {
			return i
		}
		if time.Now().After(deadline) {
			t.Fatalf("waiting for %s: last /server_info %+v", what, i)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// waitActiveHash waits until a generation running hash is active and the
// one it replaced has gone, and checks the proxy reports the same hash.
func (p *proc) waitActiveHash(t testing.TB, what, hash string) agent.Info {
	t.Helper()
	i := p.waitInfo(t, what, func(i agent.Info) bool {
		return i.ConfigHash == hash && len(i.Generations) == 1 && i.Generations[0].State == "ACTIVE"
	})
	_, body := proctest.HTTPGet("http://" + p.admin + "/server_info")
	var si struct {
		ConfigHash string `json:"configHash"`
	}
	if err := json.Unmarshal([]byte(body), &si); err != nil || si.ConfigHash != hash {
		t.Errorf("%s: proxy /server_info configHash %q (%v), want %s", what, si.ConfigHash, err, hash)
	}
	return i
}

// skips counts the agent's "configuration unchanged" log lines: watch
// events whose reload found the same config hash.
func (p *proc) skips() int { return strings.Count(p.out.String(), "configuration unchanged") }

// waitSkip waits until the agent has skipped another watch reload after
// the n seen so far.
func (p *proc) waitSkip(t *testing.T, what string, n int) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for p.skips() <= n {
		if time.Now().After(deadline) {
			t.Fatalf("%s: the agent did not see the change (no skipped reload logged)", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestRotatedCAFileHotRestarts: the agent watches the CA file an l7
// cluster references. New contents are a hot restart (the config hash
// covers the file); the same bytes written again are seen and skipped; a
// rotation to a bad file is refused naming the field and the path while
// the running generation keeps serving, and its repair is picked up. A
// file the config no longer references is no longer watched.
func TestRotatedCAFileHotRestarts(t *testing.T) {
	p := startAgent(t, httpBackend(t))
	ca := filepath.Join(t.TempDir(), "ca.pem")
	firstCA := newCAPEM(t)
	writeFile(t, ca, firstCA)
	doc := tlsClusterConfig(fmt.Sprintf("{mode: SIMPLE, caCertificates: %q}", ca))
	writeFile(t, p.configPath, doc)
	before := p.waitActiveHash(t, "the TLS config", configHash(t, doc))

	// (b) The same bytes again: seen, same hash, no restart.
	n := p.skips()
	writeFile(t, ca, firstCA)
	p.waitSkip(t, "CA rewritten with the same bytes", n)
	if i := p.info(t); i.ActiveGeneration != before.ActiveGeneration || i.ConfigHash != before.ConfigHash {
		t.Fatalf("same bytes rewritten: generation %d → %d, hash %s → %s", before.ActiveGeneration, i.ActiveGeneration, before.ConfigHash, i.ConfigHash)
	}

	// (a) A different CA: a new generation with a new hash.
	rotatedCA := newCAPEM(t)
	writeFile(t, ca, rotatedCA)
	rotated := p.waitActiveHash(t, "the rotated CA", configHash(t, doc))
	if rotated.ActiveGeneration <= before.ActiveGeneration || rotated.ConfigHash == before.ConfigHash {
		t.Fatalf("rotation: generation %d → %d, hash %s → %s", before.ActiveGeneration, rotated.ActiveGeneration, before.ConfigHash, rotated.ConfigHash)
	}
	if err := get(p.outbound); err != nil {
		t.Errorf("new generation does not serve: %v", err)
	}

	// (c) A rotation to a bad file: refused, the field and path named, the
	// running generation keeps serving.
	failures := p.metric(t, `meshlet_agent_reloads_total{result="failure"}`)
	writeFile(t, ca, []byte("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n"))
	bad := p.waitInfo(t, "the bad rotation reported", func(i agent.Info) bool {
		return strings.Contains(i.LastReloadError, "l7.clusters[0].tls.caCertificates") && strings.Contains(i.LastReloadError, ca)
	})
	if bad.ActiveGeneration != rotated.ActiveGeneration || bad.ConfigHash != rotated.ConfigHash {
		t.Errorf("bad rotation: generation %d → %d, hash %s → %s", rotated.ActiveGeneration, bad.ActiveGeneration, rotated.ConfigHash, bad.ConfigHash)
	}
	if v := p.metric(t, `meshlet_agent_reloads_total{result="failure"}`); v <= failures {
		t.Errorf("failure metric %v → %v", failures, v)
	}
	if err := get(p.outbound); err != nil {
		t.Errorf("old generation stopped serving after a bad rotation: %v", err)
	}
	// Rolled back to what runs: nothing to restart, and the failure no
	// longer stands.
	n = p.skips()
	writeFile(t, ca, rotatedCA)
	p.waitSkip(t, "the bad rotation rolled back", n)
	if i := p.info(t); i.LastReloadError != "" || i.ActiveGeneration != rotated.ActiveGeneration {
		t.Errorf("rolled back: generation %d → %d, lastReloadError %q", rotated.ActiveGeneration, i.ActiveGeneration, i.LastReloadError)
	}
	// The bad file is still watched: a new good one restarts.
	writeFile(t, ca, []byte("not a certificate\n"))
	p.waitInfo(t, "the second bad rotation reported", func(i agent.Info) bool { return strings.Contains(i.LastReloadError, ca) })
	writeFile(t, ca, newCAPEM(t))
	repaired := p.waitActiveHash(t, "the repaired CA", configHash(t, doc))
	if repaired.ActiveGeneration <= rotated.ActiveGeneration || repaired.LastReloadError != "" {
		t.Errorf("repair: generation %d → %d, lastReloadError %q", rotated.ActiveGeneration, repaired.ActiveGeneration, repaired.LastReloadError)
	}

	// A config that references another CA: the old file's directory no
	// longer counts, the new one does.
	other := filepath.Join(t.TempDir(), "ca.pem")
	writeFile(t, other, newCAPEM(t))
	doc2 := tlsClusterConfig(fmt.Sprintf("{mode: SIMPLE, caCertificates: %q}", other))
	writeFile(t, p.configPath, doc2)
	moved := p.waitActiveHash(t, "the config with another CA", configHash(t, doc2))
	n = p.skips()
	writeFile(t, ca, newCAPEM(t))
	time.Sleep(time.Second) // the debounce is 100ms: a reload would have happened by now
	if i := p.info(t); p.skips() != n || i.ActiveGeneration != moved.ActiveGeneration {
		t.Errorf("a file no longer referenced caused a reload: generation %d → %d, skipped reloads %d → %d", moved.ActiveGeneration, i.ActiveGeneration, n, p.skips())
	}
	writeFile(t, other, newCAPEM(t))
	if i := p.waitActiveHash(t, "the other CA rotated", configHash(t, doc2)); i.ActiveGeneration <= moved.ActiveGeneration {
		t.Errorf("other CA rotated: generation %d → %d", moved.ActiveGeneration, i.ActiveGeneration)
	}
}

// secretVolume lays out dir as kubelet does a Secret volume: the data in a
// timestamped directory, "..data" a symlink to it, and each key a symlink
// through "..data".
type secretVolume struct {
	dir string
	n   int
}

// update writes files into a new data directory and swaps "..data" to it
// atomically (create a temporary symlink, rename it over "..data"), then
// removes the previous data directory — kubelet's AtomicWriter order.
func (s *secretVolume) update(t *testing.T, files map[string][]byte) {
	t.Helper()
	s.n++
	name := fmt.Sprintf("..2026_12_02_15_00_%02d.%d", s.n, 1000+s.n)
	if err := os.Mkdir(filepath.Join(s.dir, name), 0o755); err != nil {
		t.Fatal(err)
	}
	for k, b := range files {
		if err := os.MkdirAll(filepath.Dir(filepath.Join(s.dir, name, k)), 0o755); err != nil {
			t.Fatal(err)
		}
		writeFile(t, filepath.Join(s.dir, name, k), b)
	}
	old, _ := os.Readlink(filepath.Join(s.dir, "..data"))
	tmp := filepath.Join(s.dir, "..data_tmp")
	if err := os.Symlink(name, tmp); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(s.dir, "..data")); err != nil {
		t.Fatal(err)
	}
	for k := range files {
		top, _, _ := strings.Cut(k, "/") // a nested key: the link is its top directory
		if err := os.Symlink(filepath.Join("..data", top), filepath.Join(s.dir, top)); err != nil && !os.IsExist(err) {
			t.Fatal(err)
		}
	}
	if old != "" {
		if err := os.RemoveAll(filepath.Join(s.dir, old)); err != nil {
			t.Fatal(err)
		}
	}
}

// TestSecretVolumeRotation: MUTUAL TLS files from a Secret volume layout.
// Swapping "..data" to new certificates is a hot restart; swapping it to a
// key that does not match the certificate is refused naming privateKey and
// its path, and the running generation keeps serving.
func TestSecretVolumeRotation(t *testing.T) {
	p := startAgent(t, httpBackend(t))
	sv := &secretVolume{dir: t.TempDir()}
	caPEM, certPEM, keyPEM := newKeyPair(t)
	sv.update(t, map[string][]byte{"ca.crt": caPEM, "tls.crt": certPEM, "tls.key": keyPEM})
	key := filepath.Join(sv.dir, "tls.key")
	doc := tlsClusterConfig(fmt.Sprintf("{mode: MUTUAL, caCertificates: %q, clientCertificate: %q, privateKey: %q}",
		filepath.Join(sv.dir, "ca.crt"), filepath.Join(sv.dir, "tls.crt"), key))
	writeFile(t, p.configPath, doc)
	before := p.waitActiveHash(t, "the MUTUAL config", configHash(t, doc))

	caPEM, certPEM, keyPEM = newKeyPair(t)
	sv.update(t, map[string][]byte{"ca.crt": caPEM, "tls.crt": certPEM, "tls.key": keyPEM})
	rotated := p.waitActiveHash(t, "the rotated Secret", configHash(t, doc))
	if rotated.ActiveGeneration <= before.ActiveGeneration || rotated.ConfigHash == before.ConfigHash {
		t.Fatalf("rotation: generation %d → %d, hash %s → %s", before.ActiveGeneration, rotated.ActiveGeneration, before.ConfigHash, rotated.ConfigHash)
	}

	_, _, otherKey := newKeyPair(t)
	sv.update(t, map[string][]byte{"ca.crt": caPEM, "tls.crt": certPEM, "tls.key": otherKey})
	bad := p.waitInfo(t, "the mismatched key reported", func(i agent.Info) bool {
		return strings.Contains(i.LastReloadError, "l7.clusters[0].tls.privateKey") && strings.Contains(i.LastReloadError, key) &&
			strings.Contains(i.LastReloadError, "does not match")
	})
	if bad.ActiveGeneration != rotated.ActiveGeneration || bad.ConfigHash != rotated.ConfigHash {
		t.Errorf("bad rotation: generation %d → %d, hash %s → %s", rotated.ActiveGeneration, bad.ActiveGeneration, rotated.ConfigHash, bad.ConfigHash)
	}
	if err := get(p.outbound); err != nil {
		t.Errorf("old generation stopped serving after a bad rotation: %v", err)
	}
}

// TestSecretVolumeNestedPath: a Secret item with a nested path
// (dir/certs -> ..data/certs, the CA at dir/certs/ca.crt): the "..data"
// swap happens one directory up and is seen there.
func TestSecretVolumeNestedPath(t *testing.T) {
	p := startAgent(t, httpBackend(t))
	sv := &secretVolume{dir: t.TempDir()}
	sv.update(t, map[string][]byte{"certs/ca.crt": newCAPEM(t)})
	doc := tlsClusterConfig(fmt.Sprintf("{mode: SIMPLE, caCertificates: %q}", filepath.Join(sv.dir, "certs", "ca.crt")))
	writeFile(t, p.configPath, doc)
	before := p.waitActiveHash(t, "the config", configHash(t, doc))
	for i := range 2 { // every swap, not only the first
		sv.update(t, map[string][]byte{"certs/ca.crt": newCAPEM(t)})
		after := p.waitActiveHash(t, fmt.Sprintf("rotation %d", i+1), configHash(t, doc))
		if after.ActiveGeneration <= before.ActiveGeneration {
			t.Fatalf("rotation %d: generation %d → %d", i+1, before.ActiveGeneration, after.ActiveGeneration)
		}
		before = after
	}
}
