package upstream

import (
	"net/netip"
	"sync/atomic"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
)

func testCluster(t *testing.T, cfg config.Cluster, clock func() time.Time) *Cluster {
	t.Helper()
	c := New(cfg, Options{Direction: l4.Outbound, Clock: clock})
	t.Cleanup(c.Retire)
	return c
}

// TestPickOutlierEjection: an endpoint ejected by outlier detection is not
// picked until its ejection time has passed; with every endpoint ejected
// the pool is used anyway (panic mode), so the cluster still gets traffic.
func TestPickOutlierEjection(t *testing.T) {
	t.Parallel()
	var skew atomic.Int64
	base := time.Now()
	clock := func() time.Time { return base.Add(time.Duration(skew.Load())) }
	c := testCluster(t, config.Cluster{Name: "c",
		Endpoints: []config.Endpoint{{Address: "10.0.0.1:80"}, {Address: "10.0.0.2:80"}},
		Outlier:   &config.OutlierDetection{Consecutive5xx: 2, BaseEjectionTime: config.Duration{D: 10 * time.Second}, MaxEjectionPercent: 100}}, clock)
	eps := c.Endpoints()
	bad := eps[0]
	c.Record(bad, Outcome5xx)
	if bad.Ejected() {
		t.Fatal("ejected after one 5xx of two")
	}
	c.Record(bad, Outcome5xx)
	if !bad.Ejected() {
		t.Fatal("not ejected after two consecutive 5xx")
	}
	for range 20 {
		if ep := c.Pick("", netip.AddrPort{}, nil); ep == bad {
			t.Fatal("ejected endpoint picked")
		}
	}
	// Every endpoint ejected: panic mode picks among all.
	c.Record(eps[1], OutcomeGateway)
	c.Record(eps[1], OutcomeConnect)
	if !eps[1].Ejected() {
		t.Fatal("second endpoint not ejected")
	}
	if c.Pick("", netip.AddrPort{}, nil) == nil {
		t.Fatal("no endpoint in panic mode")
	}
	skew.Store(int64(11 * time.Second))
	seen := map[*Endpoint]bool{}
	for range 20 {
		seen[c.Pick("", netip.AddrPort{}, nil)] = true
	}
	if !seen[bad] || bad.Ejected() {
		t.Fatalf("ejection over: the endpoint is back (picked %v, ejected %v)", seen[bad], bad.Ejected())
	}
}

// TestAdmitAndSubsets: the circuit breaker admits maxRequests at once; a
// subset's pool holds the endpoints its labels select; the original
// destination clusters pick the request's destination.
func TestAdmitAndSubsets(t *testing.T) {
	t.Parallel()
	c := testCluster(t, config.Cluster{Name: "c", Pool: config.ConnectionPool{MaxRequests: 1},
		Endpoints: []config.Endpoint{{Address: "10.0.0.1:80", Labels: map[string]string{"v": "1"}}, {Address: "10.0.0.2:80", Labels: map[string]string{"v": "2"}}},
		Subsets:   []config.Subset{{Name: "v2", Labels: map[string]string{"v": "2"}}}}, nil)
	if !c.Admit() || c.Admit() {
		t.Fatal("maxRequests 1: want the first request admitted and the second refused")
	}
	c.Release()
	if !c.Admit() {
		t.Fatal("slot not released")
	}
	for range 10 {
		if ep := c.Pick("v2", netip.AddrPort{}, nil); ep.Addr() != "10.0.0.2:80" {
			t.Fatalf("subset v2 picked %s", ep.Addr())
		}
	}
	// A retry avoids the previous attempt's endpoint when it can.
	first := c.Pick("", netip.AddrPort{}, nil)
	for range 10 {
		if c.Pick("", netip.AddrPort{}, first) == first {
			t.Fatal("retry picked the endpoint it should skip")
		}
	}
	od := New(config.Cluster{Name: "passthrough"}, Options{OriginalDst: true})
	defer od.Retire()
	dst := netip.MustParseAddrPort("10.1.2.3:8080")
	if ep := od.Pick("", dst, nil); ep.Addr() != dst.String() {
		t.Fatalf("original destination cluster picked %s for %s", ep.Addr(), dst)
	}
}
