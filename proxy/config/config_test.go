package config

import (
	"strings"
	"testing"
	"time"
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
