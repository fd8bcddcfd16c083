package identity

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"sync"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"
)

// TestStoreZeroValue: an empty Store answers nil and "" and its TLS hooks
// fail with ErrNoIdentity, so a handshake before the first certificate is
// refused instead of going out without one.
func TestStoreZeroValue(t *testing.T) {
	var s Store
	if s.Certificate() != nil || s.Roots() != nil || s.Identity() != "" {
		t.Fatalf("empty store: %v %v %q", s.Certificate(), s.Roots(), s.Identity())
	}
	if _, err := s.GetCertificate(nil); !errors.Is(err, ErrNoIdentity) || err.Error() != "no workload identity yet" {
		t.Errorf("GetCertificate before Set: %v", err)
	}
	if _, err := s.GetClientCertificate(nil); !errors.Is(err, ErrNoIdentity) {
		t.Errorf("GetClientCertificate before Set: %v", err)
	}
}

// issue fetches one certificate for the token's service account from c and
// returns it with the mesh roots.
func issue(t *testing.T, c *testCA, clk *clocktesting.FakeClock, token string) (*tls.Certificate, *x509.CertPool) {
	t.Helper()
	cl := c.client(t, clk, nil)
	if err := os.WriteFile(cl.opts.TokenFile, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	cert, err := cl.Fetch(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	roots, err := cl.roots()
	if err != nil {
		t.Fatal(err)
	}
	return cert, roots
}

// TestStoreRotationOverTLS: two Stores filled from a real CA serve mTLS
// between a loopback listener and a dialer through their hooks; after a Set
// with a new certificate the next handshake presents it, while a connection
// made before keeps working.
func TestStoreRotationOverTLS(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	c := startTestCA(t, clk)
	var server, client Store
	sc, roots := issue(t, c, clk, "team-a/reviews")
	server.Set(sc, roots)
	cc, _ := issue(t, c, clk, "team-b/productpage")
	client.Set(cc, roots)
	if got := server.Identity(); got != wantSPIFFE {
		t.Fatalf("Identity = %q, want %q", got, wantSPIFFE)
	}
	if server.Roots() != roots || server.Certificate() != sc {
		t.Fatal("Store does not return what was Set")
	}

	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		GetCertificate: server.GetCertificate, ClientAuth: tls.RequireAnyClientCert, MinVersion: tls.VersionTLS13,
		// The verifier reads the roots per handshake, as the data path does.
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			return verifyLeaf(raw, server.Roots())
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				b := make([]byte, 1)
				for {
					if _, err := conn.Read(b); err != nil {
						return
					}
					if _, err := conn.Write(b); err != nil {
						return
					}
				}
			}()
		}
	}()
	dial := func() (*tls.Conn, string) {
		t.Helper()
		conn, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{
			GetClientCertificate: client.GetClientCertificate, MinVersion: tls.VersionTLS13,
			InsecureSkipVerify: true, //nolint:gosec // verified below against the Store's roots
			VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
				return verifyLeaf(raw, client.Roots())
			},
		})
		if err != nil {
			t.Fatalf("mTLS dial: %v", err)
		}
		return conn, conn.ConnectionState().PeerCertificates[0].SerialNumber.String()
	}
	echo := func(conn *tls.Conn) {
		t.Helper()
		if _, err := conn.Write([]byte("x")); err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Read(make([]byte, 1)); err != nil {
			t.Fatalf("echo: %v", err)
		}
	}
	old, serial := dial()
	defer old.Close()
	echo(old)
	if serial != sc.Leaf.SerialNumber.String() {
		t.Fatalf("server presented serial %s, want %s", serial, sc.Leaf.SerialNumber)
	}

	sc2, _ := issue(t, c, clk, "team-a/reviews")
	server.Set(sc2, roots)
	conn, serial := dial()
	defer conn.Close()
	if serial != sc2.Leaf.SerialNumber.String() {
		t.Errorf("after Set the server presented serial %s, want the new %s", serial, sc2.Leaf.SerialNumber)
	}
	echo(old)
}

func verifyLeaf(raw [][]byte, roots *x509.CertPool) error {
	if roots == nil {
		return ErrNoIdentity
	}
	leaf, err := x509.ParseCertificate(raw[0])
	if err != nil {
		return err
	}
	_, err = leaf.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err
}

// TestStoreConcurrent: Set and every reader race freely (run with -race);
// a reader sees either nothing or one whole value, never a certificate of
// one Set with the identity of another.
func TestStoreConcurrent(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	c := startTestCA(t, clk)
	a, roots := issue(t, c, clk, "team-a/reviews")
	b, _ := issue(t, c, clk, "team-b/productpage")
	var s Store
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				cert, err := s.GetCertificate(nil)
				if err != nil {
					continue
				}
				if cert != a && cert != b {
					t.Error("GetCertificate returned a certificate never Set")
					return
				}
				_ = s.Identity()
				_ = s.Roots()
			}
		}()
	}
	for i := range 2000 {
		if i%2 == 0 {
			s.Set(a, roots)
		} else {
			s.Set(b, roots)
		}
	}
	close(stop)
	wg.Wait()
	if s.Identity() != "spiffe://cluster.local/ns/team-b/sa/productpage" {
		t.Errorf("after the last Set Identity = %q", s.Identity())
	}
}
