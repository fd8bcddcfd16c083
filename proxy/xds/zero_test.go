package xds

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"
)

// answer posts one request for reviews and returns its status and body.
func answer(t *testing.T, c *http.Client, proxyAddr string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodPost, "http://"+proxyAddr+"/", bytes.NewReader([]byte("ping")))
	req.Host = "reviews.shop.svc.cluster.local:9080"
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b))
}

// TestScaledToZero: a service whose endpoints are all gone (scaled to
// zero) is a known cluster without endpoints: 503 "no healthy upstream"
// (the engine's UH answer), as Envoy answers, not `no cluster "NAME"`
// (NC); the
// configuration is complete (ready), and endpoints coming back (EDS only)
// serve again, as does a second scale to zero.
func TestScaledToZero(t *testing.T) {
	m, v1, _ := canary(t, 100, 0)
	delete(m.Weights, "v2")
	delete(m.Subsets, "v2")
	m.Subsets["v1"] = nil
	srv := startCP(t, "")
	srv.Set(t, "1", m.Resources())
	px := startProxy(t, Options{Address: srv.Addr}, "10.96.0.10:9080")
	if err := px.client.WaitReady(context.Background(), 10*time.Second); err != nil {
		t.Fatalf("a cluster without endpoints keeps the configuration from being complete: %v", err)
	}
	c := httpClient()
	expectUH := func(when string) {
		t.Helper()
		code, body := answer(t, c, px.addr)
		if code != http.StatusServiceUnavailable || body != "no healthy upstream" {
			t.Errorf("%s: %d %q; want 503 \"no healthy upstream\" (UH)", when, code, body)
		}
	}
	expectUH("scaled to zero")

	m.Subsets["v1"] = []string{v1.addr}
	srv.Set(t, "2", m.Resources())
	waitFor(t, "the endpoint back", 5*time.Second, func() bool { return edsVersions(px.client) == 1 })
	if b, err := post(c, px.addr, "reviews.shop.svc.cluster.local:9080"); err != nil || b != "v1" {
		t.Fatalf("with the endpoint back: %q, %v", b, err)
	}

	m.Subsets["v1"] = nil
	srv.Set(t, "3", m.Resources())
	waitFor(t, "no endpoints again", 5*time.Second, func() bool { return edsVersions(px.client) == 0 && px.client.Status().Versions["eds"] == "3" })
	expectUH(fmt.Sprintf("scaled to zero again (status %+v)", px.client.Status()))
}
