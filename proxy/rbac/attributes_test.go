package rbac

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"net/url"
	"testing"
	"time"
)

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pool *x509.CertPool
}

func newCA(t *testing.T) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test root"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return &testCA{cert, key, pool}
}

// issue makes a leaf certificate with the given URI SAN (and 127.0.0.1).
func (ca *testCA) issue(t *testing.T, uri string, serial int64) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}}
	if uri != "" {
		u, err := url.Parse(uri)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}

// TestHTTPAttributesOverMutualTLS: a real TLS server takes the peer
// principal from the verified client certificate, and the evaluator
// answers 403 "RBAC: access denied" for what the policy does not allow.
func TestHTTPAttributesOverMutualTLS(t *testing.T) {
	ca := newCA(t)
	e := compile(t, `{"action":"ALLOW","policies":{"ns[shop]-policy[public]-rule[0]":{
		"permissions":[{"andRules":{"rules":[{"header":{"name":":method","stringMatch":{"exact":"GET"}}},{"urlPath":{"path":{"exact":"/public"}}}]}}],
		"principals":[{"andIds":{"ids":[{"authenticated":{"principalName":{"safeRegex":{"regex":".*/ns/frontend/.*"}}}}]}}]}}}`)
	var seen Attributes
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		local := r.Context().Value(http.LocalAddrContextKey).(net.Addr)
		a := HTTPAttributes(r, netip.MustParseAddrPort(local.String()))
		seen = a
		if d := e.Evaluate(&a); !d.Allowed {
			http.Error(w, DeniedBody, DeniedStatus)
			return
		}
		io.WriteString(w, "ok")
	}))
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{ca.issue(t, "spiffe://cluster.local/ns/shop/sa/reviews", 2)},
		ClientAuth: tls.VerifyClientCertIfGiven, ClientCAs: ca.pool}
	srv.StartTLS()
	defer srv.Close()
	client := func(cert *tls.Certificate) *http.Client {
		cfg := &tls.Config{RootCAs: ca.pool}
		if cert != nil {
			cfg.Certificates = []tls.Certificate{*cert}
		}
		return &http.Client{Transport: &http.Transport{TLSClientConfig: cfg}}
	}
	frontend := ca.issue(t, "spiffe://cluster.local/ns/frontend/sa/web", 3)
	other := ca.issue(t, "spiffe://cluster.local/ns/shop/sa/sleep", 4)
	for _, c := range []struct {
		name, method, path string
		cert               *tls.Certificate
		status             int
		principal          string
	}{
		{"frontend GET /public", "GET", "/public?x=1", &frontend, 200, "spiffe://cluster.local/ns/frontend/sa/web"},
		{"frontend POST /public", "POST", "/public", &frontend, 403, "spiffe://cluster.local/ns/frontend/sa/web"},
		{"frontend GET /other", "GET", "/other", &frontend, 403, "spiffe://cluster.local/ns/frontend/sa/web"},
		{"shop GET /public", "GET", "/public", &other, 403, "spiffe://cluster.local/ns/shop/sa/sleep"},
		{"no client certificate", "GET", "/public", nil, 403, ""},
	} {
		req, _ := http.NewRequest(c.method, srv.URL+c.path, nil)
		resp, err := client(c.cert).Do(req)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != c.status {
			t.Errorf("%s: status %d (%q), want %d", c.name, resp.StatusCode, body, c.status)
		}
		if c.status == 403 && string(body) != DeniedBody+"\n" {
			t.Errorf("%s: body %q, want %q", c.name, body, DeniedBody)
		}
		if seen.Principal != c.principal {
			t.Errorf("%s: principal %q, want %q", c.name, seen.Principal, c.principal)
		}
		if !seen.SourceIP.IsLoopback() || seen.DestinationPort == 0 || seen.Method != c.method {
			t.Errorf("%s: attributes %+v", c.name, seen)
		}
	}
}

// TestPeerPrincipalNeedsVerification: a certificate the server did not
// verify gives no principal, so it cannot claim an identity.
func TestPeerPrincipalNeedsVerification(t *testing.T) {
	ca := newCA(t)
	forged := newCA(t).issue(t, "spiffe://cluster.local/ns/frontend/sa/web", 5)
	srvCert := ca.issue(t, "", 6)
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{srvCert}, ClientAuth: tls.RequestClientCert})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan Attributes, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		tc := c.(*tls.Conn)
		if err := tc.Handshake(); err != nil {
			got <- Attributes{Path: err.Error()}
			return
		}
		cs := tc.ConnectionState()
		got <- ConnAttributes(netip.MustParseAddrPort(c.RemoteAddr().String()), netip.MustParseAddrPort(c.LocalAddr().String()), &cs)
	}()
	c, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: ca.pool, Certificates: []tls.Certificate{forged}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	a := <-got
	if a.Principal != "" || a.Path != "" {
		t.Errorf("unverified certificate: principal %q (handshake %q), want none", a.Principal, a.Path)
	}
	if !a.SourceIP.IsLoopback() || a.DestinationPort == 0 {
		t.Errorf("attributes %+v", a)
	}
}
