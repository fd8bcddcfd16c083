package mtls_test

import (
	"bufio"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/identity"
	"github.com/meshlet/meshlet/proxy/mtls"
	"github.com/meshlet/meshlet/proxy/mtls/mtlstest"
	"github.com/meshlet/meshlet/proxy/stats"
)

// pair is a server and a client identity of one mesh.
func pair(t testing.TB) (c *mtlstest.CA, server, client *identity.Store) {
	c = mtlstest.NewCA(t)
	server, client = &identity.Store{}, &identity.Store{}
	server.Set(c.Issue(t, "shop", "api"), c.Roots())
	client.Set(c.Issue(t, "front", "web"), c.Roots())
	return c, server, client
}

// echoServer accepts on a loopback listener, runs Accept under mode and
// answers one line per connection: "tls <peer>" or "plain", then echoes
// the line it read.
func echoServer(t *testing.T, in *mtls.Inbound, mode string) (addr string, errs chan error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	errs = make(chan error, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc, cs, err := in.Accept(context.Background(), c, mode)
				if err != nil {
					errs <- err
					return
				}
				line, _ := bufio.NewReader(sc).ReadString('\n')
				who := "plain"
				if cs != nil {
					who = "tls " + mtls.PeerIdentity(cs) + " " + cs.NegotiatedProtocol
				}
				_, _ = io.WriteString(sc, who+" "+line)
			}()
		}
	}()
	return ln.Addr().String(), errs
}

func call(t *testing.T, addr string, cfg *tls.Config) (string, error) {
	t.Helper()
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	_ = raw.SetDeadline(time.Now().Add(5 * time.Second))
	c := net.Conn(raw)
	if cfg != nil {
		tc, err := mtls.Dial(context.Background(), raw, cfg)
		if err != nil {
			return "", err
		}
		c = tc
	}
	if _, err := io.WriteString(c, "hello\n"); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	if len(b) == 0 && err == nil {
		err = io.EOF
	}
	return string(b), err
}

// TestModes: STRICT serves mutual TLS and refuses plain text; PERMISSIVE
// serves both on the same port; DISABLE passes the bytes (a ClientHello
// reaches the application as is).
func TestModes(t *testing.T) {
	_, server, client := pair(t)
	web := mtlstest.SPIFFE("front", "web")
	api := mtlstest.SPIFFE("shop", "api")
	r := stats.NewPrivate()
	in := mtls.NewInbound(server, 200*time.Millisecond, r)
	ccfg := func() *tls.Config { return mtls.ClientConfig(client, []string{api}, mtls.ClientHTTP1, "") }

	strict, strictErrs := echoServer(t, in, mtls.Strict)
	if got, err := call(t, strict, ccfg()); err != nil || got != "tls "+web+" "+mtls.PeerExchange+" hello\n" {
		t.Fatalf("STRICT mTLS: got %q, %v", got, err)
	}
	if got, err := call(t, strict, nil); err == nil && got != "" {
		t.Fatalf("STRICT plain text: got %q, want the connection closed", got)
	}
	if err := <-strictErrs; !errors.Is(err, mtls.ErrPlaintextRefused) {
		t.Fatalf("STRICT plain text: Accept error %v, want ErrPlaintextRefused", err)
	}

	perm, _ := echoServer(t, in, mtls.Permissive)
	if got, err := call(t, perm, ccfg()); err != nil || !strings.HasPrefix(got, "tls "+web) {
		t.Fatalf("PERMISSIVE mTLS: got %q, %v", got, err)
	}
	if got, err := call(t, perm, nil); err != nil || got != "plain hello\n" {
		t.Fatalf("PERMISSIVE plain text: got %q, %v", got, err)
	}

	dis, _ := echoServer(t, in, mtls.Disable)
	if _, err := call(t, dis, ccfg()); err == nil {
		t.Fatal("DISABLE: a TLS handshake succeeded; the ClientHello must reach the application as bytes")
	}
	if got, err := call(t, dis, nil); err != nil || got != "plain hello\n" {
		t.Fatalf("DISABLE plain text: got %q, %v", got, err)
	}
	for _, k := range []string{`{mode="STRICT",result="mtls"}`, `{mode="STRICT",result="refused_plaintext"}`, `{mode="PERMISSIVE",result="plaintext"}`} {
		if v := r.Counter("meshlet_mtls_inbound_connections_total" + k).Value(); v != 1 {
			t.Errorf("meshlet_mtls_inbound_connections_total%s = %d, want 1", k, v)
		}
	}
}

// TestPermissiveServerFirst: a client that sends nothing on a PERMISSIVE
// port is served as plain text after the first-byte timeout.
func TestPermissiveServerFirst(t *testing.T) {
	_, server, _ := pair(t)
	in := mtls.NewInbound(server, 50*time.Millisecond, nil)
	a, b := net.Pipe()
	defer a.Close()
	done := make(chan error, 1)
	go func() {
		c, cs, err := in.Accept(context.Background(), b, mtls.Permissive)
		if err == nil && (cs != nil || c != b) {
			err = errors.New("not served as plain text")
		}
		done <- err
	}()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// TestWrongSAN: a server whose certificate names another service account
// than the destination's is refused by the client with ErrPeerIdentity.
func TestWrongSAN(t *testing.T) {
	_, server, client := pair(t)
	addr, _ := echoServer(t, mtls.NewInbound(server, time.Second, nil), mtls.Strict)
	_, err := call(t, addr, mtls.ClientConfig(client, []string{mtlstest.SPIFFE("shop", "billing")}, mtls.ClientTCP, ""))
	if !errors.Is(err, mtls.ErrPeerIdentity) {
		t.Fatalf("got %v, want ErrPeerIdentity", err)
	}
	if _, err := call(t, addr, mtls.ClientConfig(client, []string{mtlstest.SPIFFE("shop", "billing"), mtlstest.SPIFFE("shop", "api")}, mtls.ClientTCP, "")); err != nil {
		t.Fatalf("one of several SANs matching: %v", err)
	}
}

// TestForeignCA: certificates of another root are refused both ways.
func TestForeignCA(t *testing.T) {
	_, server, client := pair(t)
	other := mtlstest.NewCA(t)
	stranger := &identity.Store{}
	stranger.Set(other.Issue(t, "front", "web"), other.Roots())
	addr, errs := echoServer(t, mtls.NewInbound(server, time.Second, nil), mtls.Strict)
	if got, err := call(t, addr, mtls.ClientConfig(stranger, nil, mtls.ClientTCP, "")); err == nil && got != "" {
		t.Fatalf("client of a foreign root: got %q", got)
	}
	<-errs
	// Our client does not trust a server of the foreign root.
	imp, _ := echoServer(t, mtls.NewInbound(stranger, time.Second, nil), mtls.Strict)
	if _, err := call(t, imp, mtls.ClientConfig(client, nil, mtls.ClientTCP, "")); err == nil {
		t.Fatal("server of a foreign root accepted")
	}
}

// TestNoIdentityYet: before the first certificate, a STRICT port refuses
// the handshake and a PERMISSIVE port keeps serving plain text.
func TestNoIdentityYet(t *testing.T) {
	_, _, client := pair(t)
	empty := &identity.Store{}
	in := mtls.NewInbound(empty, time.Second, nil)
	strict, errs := echoServer(t, in, mtls.Strict)
	if got, err := call(t, strict, mtls.ClientConfig(client, nil, mtls.ClientTCP, "")); err == nil && got != "" {
		t.Fatalf("STRICT without identity: got %q", got)
	}
	if err := <-errs; err == nil {
		t.Fatal("no Accept error")
	}
	perm, _ := echoServer(t, in, mtls.Permissive)
	if got, err := call(t, perm, nil); err != nil || got != "plain hello\n" {
		t.Fatalf("PERMISSIVE plain text without identity: %q, %v", got, err)
	}
}

// TestXFCC: By, Hash (SHA-256 of the peer's DER leaf, hex) and URI, as
// Istio's sidecars set them; nothing without a verified peer.
func TestXFCC(t *testing.T) {
	c, server, client := pair(t)
	_ = c
	got := make(chan string, 1)
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	go func() {
		raw, _ := ln.Accept()
		sc, cs, err := mtls.NewInbound(server, time.Second, nil).Accept(context.Background(), raw, mtls.Strict)
		if err != nil {
			got <- err.Error()
			return
		}
		defer sc.Close()
		got <- mtls.XFCC(server.Identity(), cs)
	}()
	if _, err := call(t, ln.Addr().String(), mtls.ClientConfig(client, nil, mtls.ClientTCP, "")); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	sum := sha256.Sum256(client.Certificate().Leaf.Raw)
	want := "By=" + mtlstest.SPIFFE("shop", "api") + ";Hash=" + hex.EncodeToString(sum[:]) + ";URI=" + mtlstest.SPIFFE("front", "web")
	if g := <-got; g != want {
		t.Fatalf("XFCC\n got %s\nwant %s", g, want)
	}
	if v := mtls.XFCC("x", nil); v != "" {
		t.Fatalf("XFCC of plain text = %q", v)
	}
	if ns := mtls.Namespace(mtlstest.SPIFFE("front", "web")); ns != "front" {
		t.Fatalf("Namespace = %q", ns)
	}
}

// TestRotation: a certificate set while connections are established takes
// effect for the next handshake; the old connections keep working.
func TestRotation(t *testing.T) {
	c, server, client := pair(t)
	addr, _ := echoServer(t, mtls.NewInbound(server, time.Second, nil), mtls.Strict)
	cfg := mtls.ClientConfig(client, nil, mtls.ClientTCP, "")
	first := client.Certificate().Leaf.SerialNumber
	for range 3 {
		client.Set(c.Issue(t, "front", "web"), c.Roots())
		server.Set(c.Issue(t, "shop", "api"), c.Roots())
		if _, err := call(t, addr, cfg); err != nil {
			t.Fatal(err)
		}
	}
	if client.Certificate().Leaf.SerialNumber.Cmp(first) == 0 {
		t.Fatal("certificate not rotated")
	}
}
