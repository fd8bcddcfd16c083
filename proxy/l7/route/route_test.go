package route

import (
	"errors"
	"net/http"
	"net/netip"
	"testing"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
)

// TestFindService: a request is claimed by host among the services on its
// port (exact, then wildcard suffix, then "*"), else by its original
// destination address; nil is passthrough.
func TestFindService(t *testing.T) {
	t.Parallel()
	mk := func(name string, hosts, addrs []string, ports ...uint16) *Service {
		cfg := &config.Service{Name: name, Hosts: hosts, Addresses: addrs}
		for _, p := range ports {
			cfg.Ports = append(cfg.Ports, config.PortConfig{Port: p})
		}
		return NewService(cfg, nil)
	}
	svcs := []*Service{
		mk("exact", []string{"Reviews.default.svc.cluster.local"}, nil, 9080),
		mk("wild", []string{"*.example.com"}, nil),
		mk("vip", nil, []string{"10.96.0.10", "fd00::/64"}),
	}
	for _, tt := range []struct {
		authority string
		dst       string
		want      string
	}{
		{"reviews.default.svc.cluster.local:9080", "10.0.0.1:9080", "exact"},
		{"REVIEWS.default.svc.cluster.local", "10.0.0.1:9080", "exact"},
		{"reviews.default.svc.cluster.local", "10.0.0.1:80", ""}, // other port
		{"a.b.example.com", "10.0.0.1:80", "wild"},
		{"example.com", "10.0.0.1:80", ""},
		{"unknown", "10.96.0.10:80", "vip"},
		{"unknown", "[fd00::5]:80", "vip"},
		{"[::1]:8080", "127.0.0.1:8080", ""},
	} {
		got := ""
		if s := Find(svcs, HostOnly(tt.authority), netip.MustParseAddrPort(tt.dst)); s != nil {
			got = s.Config.Name
		}
		if got != tt.want {
			t.Errorf("%s to %s: service %q, want %q", tt.authority, tt.dst, got, tt.want)
		}
	}
}

// TestCompileMatchAndRewrite: the first matching route serves; a prefix
// rewrite replaces only the matched prefix.
func TestCompileMatchAndRewrite(t *testing.T) {
	t.Parallel()
	r := Compile("s", &config.Route{Name: "api",
		Match:        []config.Match{{URI: &config.StringMatch{Prefix: "/api/"}, Method: http.MethodGet, Headers: map[string]config.StringMatch{"x-canary": {Exact: "1"}}}},
		Rewrite:      &config.Rewrite{URI: "/v1/", Authority: "api.internal"},
		Destinations: []config.Destination{{Cluster: "missing"}}}, map[string]*upstream.Cluster{}, nil)
	req, _ := http.NewRequest(http.MethodGet, "http://s/api/items", nil)
	if r.Matches(req, "s") {
		t.Fatal("matched without the x-canary header")
	}
	req.Header.Set("X-Canary", "1")
	if !r.Matches(req, "s") {
		t.Fatal("did not match")
	}
	r.Rewrite(req, "s")
	if req.URL.Path != "/v1/items" || req.Host != "api.internal" {
		t.Fatalf("rewritten to %s%s", req.Host, req.URL.Path)
	}
	if d := r.PickDest(); d.Cluster != nil || d.Name != "missing" || r.Key != "s/api" {
		t.Fatalf("destination %+v key %q: want the undefined cluster by name (503 NC)", d, r.Key)
	}
}

// TestRetryPolicyAndBudget: Istio's default retryOn retries connect
// failures and 503 but not 500; a budget of ratio 0.5 allows one retry per
// two requests, a nil budget every retry.
func TestRetryPolicyAndBudget(t *testing.T) {
	t.Parallel()
	p := CompileRetry(&config.RetryPolicy{Attempts: 2})
	if !p.Retriable(nil, &upstream.ConnectError{Err: errors.New("refused")}) {
		t.Error("connect failure not retried")
	}
	if !p.Retriable(&http.Response{StatusCode: 503, Header: http.Header{}}, nil) || p.Retriable(&http.Response{StatusCode: 500, Header: http.Header{}}, nil) {
		t.Error("default retryOn: want 503 retried and 500 not")
	}
	if CompileRetry(&config.RetryPolicy{}) != nil {
		t.Error("no attempts and no per-try timeout compiled to a policy")
	}
	b := NewBudget(&config.RetryBudget{Ratio: 0.5})
	for range 4 {
		b.Deposit()
	}
	if got := b.Requests(); got != 4 {
		t.Errorf("requests in the budget: %v, want 4", got)
	}
	var got []bool
	for range 3 {
		got = append(got, b.Withdraw())
	}
	if !got[0] || !got[1] || got[2] {
		t.Errorf("ratio 0.5 of 4 requests: withdrawals %v, want 2 retries, then none", got)
	}
	var none *Budget
	none.Deposit()
	if !none.Withdraw() {
		t.Error("a nil budget refused a retry")
	}
}
