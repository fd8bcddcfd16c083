package identity

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"os"
	"strings"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"
)

// fetched returns a Client of a fresh test CA that holds a certificate for
// token's service account.
func fetched(t *testing.T, token string) *Client {
	t.Helper()
	clk := clocktesting.NewFakeClock(time.Now())
	cl := startTestCA(t, clk).client(t, clk, nil)
	if err := os.WriteFile(cl.opts.TokenFile, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := cl.Fetch(context.Background()); err != nil {
		t.Fatal(err)
	}
	return cl
}

// TestBundleRoundTrip: what the agent encodes from its Client's certificate
// and roots, a generation's Store decodes into the same chain, key, roots
// and SPIFFE ID.
func TestBundleRoundTrip(t *testing.T) {
	cl := fetched(t, "team-a/reviews")
	if len(cl.Roots()) != 1 {
		t.Fatalf("Client.Roots() = %d certificates, want the test root", len(cl.Roots()))
	}
	b, err := MarshalBundle(cl.Current(), cl.Roots())
	if err != nil {
		t.Fatal(err)
	}
	var s Store
	if err := s.SetBundle(b); err != nil {
		t.Fatal(err)
	}
	if s.Identity() != wantSPIFFE {
		t.Errorf("Identity = %q", s.Identity())
	}
	got := s.Certificate()
	if len(got.Certificate) != len(cl.Current().Certificate) || !got.Leaf.Equal(cl.Current().Leaf) {
		t.Errorf("chain differs after the round trip")
	}
	if _, err := tls.X509KeyPair(pemChain(got), pemKey(t, got)); err != nil {
		t.Errorf("decoded key does not match the chain: %v", err)
	}
	if _, err := got.Leaf.Verify(x509.VerifyOptions{Roots: s.Roots(), KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Errorf("leaf does not verify against the decoded roots: %v", err)
	}
}

// TestBundleRefused: a bundle whose key is another certificate's, whose
// roots are another mesh's, of another version, truncated, or empty is
// refused with a message saying which, and the Store keeps what it had.
func TestBundleRefused(t *testing.T) {
	a := fetched(t, "team-a/reviews")
	other := fetched(t, "team-b/productpage") // another CA: another root
	good, err := MarshalBundle(a.Current(), a.Roots())
	if err != nil {
		t.Fatal(err)
	}
	swapKey := *a.Current()
	swapKey.PrivateKey = other.Current().PrivateKey
	wrongKey, err := MarshalBundle(&swapKey, a.Roots())
	if err != nil {
		t.Fatal(err)
	}
	wrongRoot, err := MarshalBundle(a.Current(), other.Roots())
	if err != nil {
		t.Fatal(err)
	}
	var raw bundle
	if _, err := asn1.Unmarshal(good, &raw); err != nil {
		t.Fatal(err)
	}
	raw.Version = 2
	v2, err := asn1.Marshal(raw)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		data []byte
		want string
	}{
		{"key of another certificate", wrongKey, "the key is not the leaf certificate's"},
		{"roots of another mesh", wrongRoot, "does not verify against its roots"},
		{"another version", v2, "version 2, want 1"},
		{"truncated", good[:len(good)/2], "identity bundle:"},
		{"trailing bytes", append(append([]byte{}, good...), 0, 0), "2 trailing bytes"},
		{"empty", nil, "identity bundle:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var s Store
			s.Set(a.Current(), nil)
			err := s.SetBundle(tc.data)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("SetBundle: %v, want an error containing %q", err, tc.want)
			}
			if s.Certificate() != a.Current() {
				t.Error("a refused bundle replaced the Store's certificate")
			}
		})
	}
	if _, err := MarshalBundle(a.Current(), nil); err == nil {
		t.Error("MarshalBundle without roots: no error")
	}
	if _, err := MarshalBundle(&tls.Certificate{}, a.Roots()); err == nil {
		t.Error("MarshalBundle without a certificate: no error")
	}
}

func pemChain(c *tls.Certificate) []byte {
	var out []byte
	for _, der := range c.Certificate {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})...)
	}
	return out
}

func pemKey(t *testing.T, c *tls.Certificate) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(c.PrivateKey)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}
