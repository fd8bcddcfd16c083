package generation_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/agent"
	"github.com/meshlet/meshlet/proxy/generation"
	"github.com/meshlet/meshlet/proxy/identity"
	"github.com/meshlet/meshlet/proxy/stats"
	"github.com/meshlet/meshlet/webhook/ca"
)

// issueBundle signs a fresh key for team-a/reviews with a (webhook/ca's
// authority, no server needed) and encodes it as the agent does.
func issueBundle(t *testing.T, a *ca.Authority) ([]byte, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	id := ca.Identity{TrustDomain: ca.DefaultTrustDomain, Namespace: "team-a", ServiceAccount: "reviews"}
	csr, err := ca.ParseCSR(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), id)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := a.Sign(csr, id, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert := &tls.Certificate{PrivateKey: key, Leaf: chain[0], Certificate: [][]byte{chain[0].Raw}}
	b, err := identity.MarshalBundle(cert, a.Roots())
	if err != nil {
		t.Fatal(err)
	}
	return b, chain[0].SerialNumber.Text(16)
}

// dupFD returns a duplicate of f's descriptor for the generation to own
// (Inherit closes what it is given).
func dupFD(t *testing.T, f interface{ Fd() uintptr }) int {
	t.Helper()
	fd, err := unix.Dup(int(f.Fd()))
	if err != nil {
		t.Fatal(err)
	}
	return fd
}

// TestGenerationWaitsForIdentity plays the agent for an in-process
// generation told to expect its identity over the control socket
// (agent.EnvIdentity): it does not report ready, nor serve, while it has
// none or only a bundle it refuses; the first good identity makes it ready
// with that certificate on /certs; a renewal replaces it without a restart.
func TestGenerationWaitsForIdentity(t *testing.T) {
	data, err := ca.NewSelfSigned(time.Now(), 24*time.Hour, ca.DefaultTrustDomain)
	if err != nil {
		t.Fatal(err)
	}
	authority, err := ca.ParseSecret("test", data, time.Now())
	if err != nil {
		t.Fatal(err)
	}

	admin, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	adminFile, err := admin.(*net.TCPListener).File()
	if err != nil {
		t.Fatal(err)
	}
	adminAddr := admin.Addr().String()
	admin.Close()
	_, statsFile, err := stats.Create()
	if err != nil {
		t.Fatal(err)
	}
	cfgPath := filepath.Join(t.TempDir(), "proxy.yaml")
	if err := os.WriteFile(cfgPath, []byte("apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfgFile, err := os.Open(cfgPath)
	if err != nil {
		t.Fatal(err)
	}
	readyR, readyW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	control := os.NewFile(uintptr(fds[0]), "control")
	defer control.Close()
	spec := fmt.Sprintf("admin=%d,stats=%d,config=%d,ready=%d,control=%d",
		dupFD(t, adminFile), dupFD(t, statsFile), dupFD(t, cfgFile), dupFD(t, readyW), fds[1])
	for _, f := range []*os.File{adminFile, statsFile, cfgFile, readyW} {
		f.Close()
	}
	t.Setenv(agent.EnvInheritedFDs, spec)
	t.Setenv(agent.EnvIdentity, agent.IdentityFromAgent)

	o := generation.NewOptions()
	o.DrainDuration = time.Second
	logs := &proctest.SyncBuf{}
	o.Log = logs
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- generation.Run(ctx, o) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		if t.Failed() {
			t.Logf("generation logs:\n%s", logs.String())
		}
	}()

	ready := make(chan string, 1)
	go func() {
		b := make([]byte, 64)
		n, _ := readyR.Read(b)
		ready <- string(b[:n])
		readyR.Close()
	}()
	send := func(b []byte) {
		t.Helper()
		if _, err := control.Write(append([]byte(agent.IdentityCommand+"\n"), b...)); err != nil {
			t.Fatal(err)
		}
	}
	notReady := func(what string) {
		t.Helper()
		select {
		case r := <-ready:
			t.Fatalf("%s: the generation reported %q", what, r)
		case <-time.After(time.Second):
		}
		// The socket listens (the agent's), but nobody accepts yet: a
		// request stays in the backlog unanswered.
		c, err := net.Dial("tcp", adminAddr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		fmt.Fprint(c, "GET /certs HTTP/1.0\r\n\r\n")
		_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		if n, _ := c.Read(make([]byte, 1)); n > 0 {
			t.Fatalf("%s: the admin listener answers", what)
		}
	}
	notReady("no identity yet")

	good, serial := issueBundle(t, authority)
	other, _ := issueBundle(t, authority)
	send(good[:len(good)-1]) // cut short
	send(other[:len(other)/2])
	notReady("a refused bundle")

	send(good)
	select {
	case r := <-ready:
		if r != "READY\n" {
			t.Fatalf("the generation reported %q", r)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("not ready after its identity arrived")
	}
	certSerial := func() string {
		_, body := proctest.HTTPGet("http://" + adminAddr + "/certs")
		var c identity.Certs
		if err := json.Unmarshal([]byte(body), &c); err != nil || len(c.Certificates) == 0 {
			t.Fatalf("/certs %q: %v", body, err)
		}
		return c.Certificates[0].CertChain[0].SerialNumber
	}
	if got := certSerial(); got != serial {
		t.Fatalf("/certs serial %s, want %s", got, serial)
	}

	renewed, serial2 := issueBundle(t, authority)
	send(renewed)
	deadline := time.Now().Add(5 * time.Second)
	for certSerial() != serial2 {
		if time.Now().After(deadline) {
			t.Fatal("the renewal did not replace the certificate")
		}
		time.Sleep(10 * time.Millisecond)
	}
	if !strings.Contains(logs.String(), "workload identity refused") {
		t.Error("the refused bundle was not logged")
	}
	if strings.Contains(logs.String(), "PRIVATE KEY") {
		t.Error("the logs carry a private key")
	}
}
