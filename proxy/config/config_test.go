package config

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/webhook/certs"
)

func TestDefault(t *testing.T) {
	c := Default()
	if c.Inbound.ConnectTimeout.Duration != 10*time.Second || c.Outbound.IdleTimeout.Duration != time.Hour {
		t.Errorf("defaults not applied: %+v", c.Config)
	}
	if got := c.SourceIPv4().String(); got != "127.0.0.6" {
		t.Errorf("SourceIPv4 = %s", got)
	}
	if got := c.SourceIPv6().String(); got != "::6" {
		t.Errorf("SourceIPv6 = %s", got)
	}
	if len(c.Hash) != 64 {
		t.Errorf("hash %q", c.Hash)
	}
}

func TestParse(t *testing.T) {
	t.Parallel()
	head := "apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\n"
	tests := []struct {
		name    string
		doc     string
		wantErr []string // substrings, all must appear
	}{
		{name: "minimal", doc: head},
		{name: "json", doc: `{"apiVersion":"meshlet.io/v1alpha1","kind":"ProxyConfig","outbound":{"maxConnections":5}}`},
		{name: "full", doc: head + "inbound:\n  connectTimeout: 1s\n  idleTimeout: 2m\n  maxConnections: 100\n  passthroughSourceIPv4: 127.0.0.7\n  passthroughSourceIPv6: \"::7\"\noutbound:\n  connectTimeout: 3s\n"},
		{name: "unknown field", doc: head + "inbound:\n  conectTimeout: 1s\n", wantErr: []string{`unknown field "conectTimeout"`}},
		{name: "wrong version", doc: "apiVersion: v2\nkind: Nope\n", wantErr: []string{`apiVersion: invalid value "v2"`, `kind: invalid value "Nope"`}},
		{name: "bad duration", doc: head + "outbound:\n  idleTimeout: soon\n", wantErr: []string{"decoding", "soon"}},
		{name: "all errors at once", doc: head + "inbound:\n  connectTimeout: -1s\n  maxConnections: -3\n  passthroughSourceIPv4: \"::1\"\n  passthroughSourceIPv6: 10.0.0.1\noutbound:\n  idleTimeout: 1ms\n  passthroughSourceIPv4: 127.0.0.6\n",
			wantErr: []string{"inbound.connectTimeout: invalid value -1s", "inbound.maxConnections: invalid value -3", `inbound.passthroughSourceIPv4: invalid value "::1"`, `inbound.passthroughSourceIPv6: invalid value "10.0.0.1"`, "outbound.idleTimeout: invalid value 1ms", "outbound.passthroughSourceIPv4/IPv6"}},
		{name: "garbage", doc: "\x00\x01{{{", wantErr: []string{"decoding"}},
		{name: "empty", doc: "", wantErr: []string{"apiVersion"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := Parse([]byte(tc.doc))
			if len(tc.wantErr) == 0 {
				if err != nil {
					t.Fatalf("Parse: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("Parse succeeded, want errors %q", tc.wantErr)
			}
			for _, w := range tc.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestLoadFileMissing(t *testing.T) {
	_, err := LoadFile(t.TempDir() + "/nope.yaml")
	if err == nil || !strings.Contains(err.Error(), "nope.yaml") {
		t.Fatalf("err = %v", err)
	}
}

// newCA returns a fresh self-signed CA certificate (PEM).
func newCA(t *testing.T) []byte {
	t.Helper()
	_, certPEM, _, err := certs.NewAuthority(time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return certPEM
}

// TestHashCoversReferencedFiles: the hash of a config that references TLS
// files changes when a file's contents change (a rotated CA), not when the
// same bytes are written again; Files lists the files; a config without
// files keeps the SHA-256 of its bytes.
func TestHashCoversReferencedFiles(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	ca := filepath.Join(dir, "ca.pem")
	first := newCA(t)
	if err := os.WriteFile(ca, first, 0o600); err != nil {
		t.Fatal(err)
	}
	doc := fmt.Appendf(nil, "apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\nl7:\n  clusters:\n  - name: api\n    endpoints: [{address: \"127.0.0.1:8443\"}]\n    tls: {mode: SIMPLE, caCertificates: %q}\n", ca)
	parse := func() *Loaded {
		t.Helper()
		l, err := Parse(doc)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	l1 := parse()
	if !slices.Equal(l1.Files, []string{ca}) {
		t.Errorf("Files = %q, want [%q]", l1.Files, ca)
	}
	if string(l1.Raw) != string(doc) {
		t.Errorf("Raw is not the document: %q", l1.Raw)
	}
	if sum := sha256.Sum256(doc); l1.Hash == hex.EncodeToString(sum[:]) {
		t.Error("hash covers only the document, not the CA file")
	}
	if err := os.WriteFile(ca, first, 0o600); err != nil {
		t.Fatal(err)
	}
	if h := parse().Hash; h != l1.Hash {
		t.Errorf("same bytes rewritten: hash changed %s → %s", l1.Hash, h)
	}
	if err := os.WriteFile(ca, newCA(t), 0o600); err != nil {
		t.Fatal(err)
	}
	if h := parse().Hash; h == l1.Hash {
		t.Error("rotated CA file: hash unchanged")
	}

	// The same contents under another path is another configuration.
	moved := filepath.Join(dir, "ca2.pem")
	if err := os.WriteFile(moved, first, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(ca, first, 0o600); err != nil {
		t.Fatal(err)
	}
	l2, err := Parse([]byte(strings.ReplaceAll(string(doc), ca, moved)))
	if err != nil {
		t.Fatal(err)
	}
	if l2.Hash == l1.Hash {
		t.Error("hash does not cover the file's path")
	}

	plain := []byte("apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\n")
	l3, err := Parse(plain)
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(plain); l3.Hash != hex.EncodeToString(sum[:]) || len(l3.Files) != 0 {
		t.Errorf("config without files: hash %s files %q, want the SHA-256 of its bytes and no files", l3.Hash, l3.Files)
	}
}

// TestBadReferencedFile: a referenced file that is not a certificate is a
// parse error naming the field and the path; ReferencedFiles still lists it,
// so the agent keeps watching it.
func TestBadReferencedFile(t *testing.T) {
	t.Parallel()
	ca := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(ca, []byte("not a certificate\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	doc := fmt.Appendf(nil, "apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\nl7:\n  clusters:\n  - name: api\n    endpoints: [{address: \"127.0.0.1:8443\"}]\n    tls: {mode: SIMPLE, caCertificates: %q}\n", ca)
	_, err := Parse(doc)
	if err == nil || !strings.Contains(err.Error(), "l7.clusters[0].tls.caCertificates") || !strings.Contains(err.Error(), ca) {
		t.Fatalf("Parse error %v does not name the field and %s", err, ca)
	}
	if got := ReferencedFiles(doc); !slices.Equal(got, []string{ca}) {
		t.Errorf("ReferencedFiles = %q, want [%q]", got, ca)
	}
	if got := ReferencedFiles([]byte("\x00{{{")); got != nil {
		t.Errorf("ReferencedFiles of garbage = %q", got)
	}
}
