package l7

import (
	"fmt"
	"math"
	"net/http"
	"strings"
	"testing"

	"github.com/meshlet/meshlet/proxy/l4"
)

func TestRouting(t *testing.T) {
	t.Parallel()
	v1 := startBackend(t, "v1", nil)
	v2 := startBackend(t, "v2", nil)
	api := startBackend(t, "api", nil)
	orig := startBackend(t, "orig", nil)
	cfg := mustLoad(t, fmt.Sprintf(`
services:
- name: reviews
  hosts: [reviews, reviews.default.svc.cluster.local]
  ports: [{port: 9080, name: http-web}]
  routes:
  - name: canary-header
    match:
    - headers: {x-canary: {exact: "yes"}}
    destinations: [{cluster: reviews, subset: v2}]
  - name: api-rewrite
    match:
    - uri: {prefix: /api/}
      method: GET
    rewrite: {uri: /v1/, authority: api.internal}
    destinations: [{cluster: api}]
  - name: regex
    match:
    - uri: {regex: "/items/[0-9]+"}
    headers:
      request: {set: {x-route: regex}}
      response: {set: {x-served-by-route: regex}}
    destinations: [{cluster: reviews, subset: v2}]
  - name: default
    destinations: [{cluster: reviews, subset: v1}]
- name: wild
  hosts: ["*.wild.example"]
  routes:
  - name: all
    match: [{uri: {exact: /only}}]
    destinations: [{cluster: api}]
clusters:
- name: reviews
  endpoints:
  - {address: %q, labels: {version: v1}}
  - {address: %q, labels: {version: v2}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
- name: api
  endpoints: [{address: %q}]
`, v1.addr, v2.addr, api.addr))
	tp := startProxy(t, cfg, "127.0.0.1:9080", l4.Outbound)
	c := h1Client()
	tests := []struct {
		name, host, path string
		hdr              []string
		code             int
		body             string
		hdrKey, hdrVal   string
	}{
		{"default subset", "reviews:9080", "/x", nil, 200, "v1 GET reviews:9080 /x", "", ""},
		{"fqdn host", "reviews.default.svc.cluster.local", "/x", nil, 200, "v1 GET reviews.default.svc.cluster.local /x", "", ""},
		{"host case-insensitive", "REVIEWS:9080", "/x", nil, 200, "v1 GET REVIEWS:9080 /x", "", ""},
		{"header canary", "reviews", "/x", []string{"X-Canary", "yes"}, 200, "v2 GET reviews /x", "", ""},
		{"header canary other value", "reviews", "/x", []string{"X-Canary", "no"}, 200, "v1 GET reviews /x", "", ""},
		{"prefix rewrite", "reviews", "/api/books", nil, 200, "api GET api.internal /v1/books", "", ""},
		{"method mismatch falls through", "reviews", "/api/books", nil, 200, "v1 GET reviews /api/books", "", ""}, // overridden below (POST)
		{"regex full match", "reviews", "/items/42", nil, 200, "v2 GET reviews /items/42", "X-Served-By-Route", "regex"},
		{"regex not partial", "reviews", "/items/42/x", nil, 200, "v1 GET reviews /items/42/x", "", ""},
		{"wildcard host", "a.wild.example", "/only", nil, 200, "api GET a.wild.example /only", "", ""},
		{"wildcard no route", "a.wild.example", "/other", nil, 404, "no route matched", "", ""},
		{"unknown host passthrough", "elsewhere", "/z", nil, 0, "", "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if tt.name == "method mismatch falls through" {
				req, _ := http.NewRequest(http.MethodPost, "http://"+tp.addr+tt.path, strings.NewReader("b"))
				req.Host = tt.host
				resp, err := c.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				if resp.Header.Get("X-Backend") != "v1" {
					t.Fatalf("POST /api/ went to %s, want v1 (route requires GET)", resp.Header.Get("X-Backend"))
				}
				return
			}
			if tt.name == "unknown host passthrough" {
				// Original destination: point it at orig for this request.
				tp2 := startProxy(t, cfg, orig.addr, l4.Outbound)
				code, _, body := get(t, c, tp2.addr, tt.host, tt.path)
				if code != 200 || !strings.HasPrefix(body, "orig ") {
					t.Fatalf("passthrough: %d %q", code, body)
				}
				return
			}
			code, h, body := get(t, c, tp.addr, tt.host, tt.path, tt.hdr...)
			if code != tt.code || body != tt.body {
				t.Fatalf("got %d %q; want %d %q", code, body, tt.code, tt.body)
			}
			if tt.hdrKey != "" && h.Get(tt.hdrKey) != tt.hdrVal {
				t.Fatalf("header %s = %q; want %q", tt.hdrKey, h.Get(tt.hdrKey), tt.hdrVal)
			}
		})
	}
}

// binomialOK reports whether k successes in n trials is within 5 sigma of p.
func binomialOK(k, n int, p float64) bool {
	mean := float64(n) * p
	sd := math.Sqrt(float64(n) * p * (1 - p))
	return math.Abs(float64(k)-mean) <= 5*sd+1
}

func TestWeightedSplit(t *testing.T) {
	t.Parallel()
	v1 := startBackend(t, "v1", nil)
	v2 := startBackend(t, "v2", nil)
	cfg := mustLoad(t, fmt.Sprintf(`
services:
- name: s
  hosts: [s]
  routes:
  - name: canary
    destinations:
    - {cluster: c, subset: stable, weight: 90}
    - {cluster: c, subset: canary, weight: 10}
clusters:
- name: c
  endpoints:
  - {address: %q, labels: {track: stable}}
  - {address: %q, labels: {track: canary}}
  subsets:
  - {name: stable, labels: {track: stable}}
  - {name: canary, labels: {track: canary}}
`, v1.addr, v2.addr))
	tp := startProxy(t, cfg, "127.0.0.1:80", l4.Outbound)
	c := h1Client()
	const n = 2000
	canary := 0
	for i := 0; i < n; i++ {
		_, h, _ := get(t, c, tp.addr, "s", "/")
		if h.Get("X-Backend") == "v2" {
			canary++
		}
	}
	if !binomialOK(canary, n, 0.10) {
		t.Fatalf("canary got %d of %d; want ≈10%% (5σ)", canary, n)
	}
	t.Logf("canary share %.3f", float64(canary)/n)
}
