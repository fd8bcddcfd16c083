// Package config is the proxy's bootstrap configuration: a versioned YAML
// document (apiVersion meshlet.io/v1alpha1, kind ProxyConfig) that is loaded
// strictly (unknown fields are errors), defaulted, and validated as a whole so
// that every problem is reported at once, each naming its field and value.
//
// The document is designed to grow: each traffic direction has its own
// section, and further sections (L7 routing) are added as new top-level
// fields with their own Validate step. A generation of the proxy loads one
// Config and never changes it; a new configuration means a new generation
// (hot restart, see package agent).
package config

import (
	"crypto/sha256"
	_ "embed"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// APIVersion and Kind identify the document.
const (
	APIVersion = "meshlet.io/v1alpha1"
	Kind       = "ProxyConfig"
)

//go:embed default.yaml
var defaultYAML []byte

// DefaultYAML returns the embedded default configuration document (pure L4
// passthrough). The agent runs it when no --config file is given.
func DefaultYAML() []byte { return append([]byte(nil), defaultYAML...) }

// Config is the proxy bootstrap configuration.
type Config struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	// Inbound governs connections captured to the inbound listener (15006).
	Inbound L4 `json:"inbound"`
	// Outbound governs connections captured to the outbound listener (15001).
	Outbound L4 `json:"outbound"`
	// L7 turns on HTTP/gRPC traffic management (package l7): when present,
	// ports not declared tcp are served (or first detected) as HTTP. Absent:
	// pure L4 passthrough.
	L7 *L7 `json:"l7,omitempty"`
}

// L4 holds the L4 settings of one traffic direction (the direction itself
// is l4.Direction).
type L4 struct {
	// ConnectTimeout bounds connecting to the original destination.
	ConnectTimeout metav1.Duration `json:"connectTimeout,omitempty"`
	// IdleTimeout closes a connection idle in both directions for this long.
	IdleTimeout metav1.Duration `json:"idleTimeout,omitempty"`
	// MaxConnections caps concurrent connections; 0 means unlimited.
	MaxConnections int `json:"maxConnections,omitempty"`
	// PassthroughSourceIPv4 and PassthroughSourceIPv6 are the source
	// addresses of inbound connections to the application. Inbound only.
	PassthroughSourceIPv4 string `json:"passthroughSourceIPv4,omitempty"`
	PassthroughSourceIPv6 string `json:"passthroughSourceIPv6,omitempty"`
}

// Defaults used for fields left empty.
const (
	DefaultConnectTimeout = 10 * time.Second
	DefaultIdleTimeout    = time.Hour
	DefaultSourceIPv4     = "127.0.0.6"
	DefaultSourceIPv6     = "::6"
)

// Loaded is a validated configuration together with the bytes it came from
// and the files it references.
type Loaded struct {
	Config
	// Raw is the document as given.
	Raw []byte
	// Files are the absolute paths of every file the configuration reads
	// (the l7 clusters' TLS certificates and keys; see L7.Files),
	// sorted, each once. The agent watches them.
	Files []string
	// Hash identifies the configuration in effect, shown in /server_info:
	// the hex SHA-256 of Raw followed by each of Files' path and contents.
	// A rotated certificate therefore changes it (the agent's file watch
	// restarts only on a change), while rewriting the same bytes does not.
	// For a document that references no file it is the SHA-256 of Raw.
	Hash string
}

// Default returns the embedded default configuration, loaded.
func Default() *Loaded {
	l, err := Parse(defaultYAML)
	if err != nil {
		panic(fmt.Sprintf("embedded default proxy config is invalid: %v", err))
	}
	return l
}

// LoadFile reads and parses the configuration file at path.
func LoadFile(path string) (*Loaded, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading proxy config: %w", err)
	}
	l, err := Parse(b)
	if err != nil {
		return nil, fmt.Errorf("proxy config %s: %w", path, err)
	}
	return l, nil
}

// Parse decodes a YAML (or JSON) document strictly, applies defaults and
// validates it. The error lists every problem found. The files the document
// references are read, to validate them and for the Hash.
func Parse(b []byte) (*Loaded, error) {
	var c Config
	if err := yaml.UnmarshalStrict(b, &c); err != nil {
		return nil, fmt.Errorf("decoding: %w", err)
	}
	c.SetDefaults()
	if err := c.Validate(); err != nil {
		return nil, err
	}
	var files []string
	if c.L7 != nil {
		files = c.L7.Files()
	}
	hash, err := hashConfig(b, files)
	if err != nil {
		return nil, err
	}
	return &Loaded{Config: c, Raw: append([]byte(nil), b...), Files: files, Hash: hash}, nil
}

// maxHashedFile bounds what is read of a referenced file for the hash; the
// l7 validation refuses larger files (1 MiB), so only a file replaced
// between the two reads is cut short, and its next change is another reload.
const maxHashedFile = 1<<20 + 1

// hashConfig returns the hex SHA-256 of doc and of each file's path and
// contents (lengths framed, so no two inputs run into each other). The files
// were just read by validation; one that cannot be read now (removed in
// between) is an error naming its path.
func hashConfig(doc []byte, files []string) (string, error) {
	h := sha256.New()
	h.Write(doc)
	frame := func(b []byte) {
		var n [8]byte
		binary.BigEndian.PutUint64(n[:], uint64(len(b)))
		h.Write(n[:])
		h.Write(b)
	}
	for _, path := range files {
		f, err := os.Open(path)
		if err != nil {
			return "", fmt.Errorf("reading referenced file for the config hash: %w", err)
		}
		b, err := io.ReadAll(io.LimitReader(f, maxHashedFile))
		f.Close()
		if err != nil {
			return "", fmt.Errorf("reading referenced file %s for the config hash: %w", path, err)
		}
		h.Write([]byte{0})
		frame([]byte(path))
		frame(b)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// ReferencedFiles returns the files a document references (as
// Loaded.Files) without validating it, or nil when it does not decode: a
// document refused because of a bad certificate file still names the file
// whose repair should reload it.
func ReferencedFiles(b []byte) []string {
	var c Config
	if err := yaml.Unmarshal(b, &c); err != nil || c.L7 == nil {
		return nil
	}
	return c.L7.Files()
}

// SetDefaults fills empty fields with their defaults.
func (c *Config) SetDefaults() {
	for _, d := range []*L4{&c.Inbound, &c.Outbound} {
		if d.ConnectTimeout.Duration == 0 {
			d.ConnectTimeout.Duration = DefaultConnectTimeout
		}
		if d.IdleTimeout.Duration == 0 {
			d.IdleTimeout.Duration = DefaultIdleTimeout
		}
	}
	if c.Inbound.PassthroughSourceIPv4 == "" {
		c.Inbound.PassthroughSourceIPv4 = DefaultSourceIPv4
	}
	if c.Inbound.PassthroughSourceIPv6 == "" {
		c.Inbound.PassthroughSourceIPv6 = DefaultSourceIPv6
	}
}

// Validate checks the whole configuration and returns every problem, each
// naming the field path and the offending value.
func (c *Config) Validate() error {
	var errs []error
	bad := func(field string, value any, why string) {
		errs = append(errs, fmt.Errorf("%s: invalid value %v: %s", field, value, why))
	}
	if c.APIVersion != APIVersion {
		bad("apiVersion", fmt.Sprintf("%q", c.APIVersion), "must be "+APIVersion)
	}
	if c.Kind != Kind {
		bad("kind", fmt.Sprintf("%q", c.Kind), "must be "+Kind)
	}
	for _, d := range []struct {
		name string
		d    *L4
	}{{"inbound", &c.Inbound}, {"outbound", &c.Outbound}} {
		if v := d.d.ConnectTimeout.Duration; v < 0 || v > time.Hour {
			bad(d.name+".connectTimeout", v, "must be between 0 and 1h")
		}
		if v := d.d.IdleTimeout.Duration; v < 0 {
			bad(d.name+".idleTimeout", v, "must not be negative")
		} else if v > 0 && v < 100*time.Millisecond {
			bad(d.name+".idleTimeout", v, "must be at least 100ms")
		}
		if v := d.d.MaxConnections; v < 0 || v > 1<<20 {
			bad(d.name+".maxConnections", v, "must be between 0 (unlimited) and 1048576")
		}
	}
	if c.Outbound.PassthroughSourceIPv4 != "" || c.Outbound.PassthroughSourceIPv6 != "" {
		bad("outbound.passthroughSourceIPv4/IPv6", c.Outbound.PassthroughSourceIPv4+c.Outbound.PassthroughSourceIPv6, "only inbound connections have a passthrough source")
	}
	if a, err := netip.ParseAddr(c.Inbound.PassthroughSourceIPv4); err != nil || !a.Is4() {
		bad("inbound.passthroughSourceIPv4", fmt.Sprintf("%q", c.Inbound.PassthroughSourceIPv4), "must be an IPv4 address")
	}
	if a, err := netip.ParseAddr(c.Inbound.PassthroughSourceIPv6); err != nil || !a.Is6() || a.Is4In6() {
		bad("inbound.passthroughSourceIPv6", fmt.Sprintf("%q", c.Inbound.PassthroughSourceIPv6), "must be an IPv6 address")
	}
	if c.L7 != nil {
		if err := c.L7.Validate(); err != nil {
			var list []error
			if j, ok := err.(interface{ Unwrap() []error }); ok {
				list = j.Unwrap()
			} else {
				list = []error{err}
			}
			for _, e := range list {
				errs = append(errs, fmt.Errorf("l7.%w", e))
			}
		}
	}
	return errors.Join(errs...)
}

// SourceIPv4 returns the parsed inbound passthrough IPv4 source.
func (c *Config) SourceIPv4() netip.Addr {
	return netip.MustParseAddr(c.Inbound.PassthroughSourceIPv4)
}

// SourceIPv6 returns the parsed inbound passthrough IPv6 source.
func (c *Config) SourceIPv6() netip.Addr {
	return netip.MustParseAddr(c.Inbound.PassthroughSourceIPv6)
}
