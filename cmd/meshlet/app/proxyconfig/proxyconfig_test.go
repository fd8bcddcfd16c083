package proxyconfig_test

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/cmd/meshlet/app/proxyconfig"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/xds"
	"github.com/meshlet/meshlet/proxy/xds/xdstest"
)

// TestProxyConfig: a real xDS client fed by a real ADS server (the second
// version NACKed); its /config_dump, served on a loopback admin address,
// printed by `meshlet proxy-config` as tables with versions and the NACK.
func TestProxyConfig(t *testing.T) {
	id := xds.Identity{PodName: "client-0", Namespace: "shop", IP: "127.0.0.1"}
	srv := xdstest.StartServer(t, "", id.NodeID())
	m := xdstest.Mesh{Host: "reviews.shop.svc.cluster.local", Port: 9080, VIP: "10.96.0.10",
		Subsets: map[string][]string{"v1": {"127.0.0.1:10001"}, "v2": {"127.0.0.1:10002"}},
		Weights: map[string]uint32{"v1": 90, "v2": 10}}
	srv.Set(t, "1", m.Resources())
	c, err := xds.New(xds.Options{Address: srv.Addr, Node: id.Node(), Engine: xds.ApplierFunc(func(config.L7) error { return nil })})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	if err := c.WaitReady(ctx, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	bad := m.Resources()
	bad[resource.ClusterType][1].(*clusterv3.Cluster).LbPolicy = clusterv3.Cluster_MAGLEV
	srv.Set(t, "2", bad)
	deadline := time.Now().Add(5 * time.Second)
	for c.Status().LastNACK["cds"].Message == "" {
		if time.Now().After(deadline) {
			t.Fatal("no NACK")
		}
		time.Sleep(10 * time.Millisecond)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, err := c.ConfigDump(r.URL.Query().Has("include_eds"))
		if err != nil {
			http.Error(w, err.Error(), 500)
			return
		}
		_, _ = w.Write(b)
	})}
	go func() { _ = hs.Serve(ln) }()
	defer hs.Close()

	for _, tc := range []struct {
		kind string
		want []string
	}{
		{"clusters", []string{"reviews.shop.svc.cluster.local  9080  v2      outbound   EDS",
			"NACK cluster outbound|9080|v2|reviews.shop.svc.cluster.local (version 2",
			"lb_policy: MAGLEV is not supported"}},
		{"routes", []string{"9080  reviews.shop.svc.cluster.local:9080", "outbound|9080|v1|reviews.shop.svc.cluster.local 90, outbound|9080|v2|reviews.shop.svc.cluster.local 10"}},
		{"endpoints", []string{"127.0.0.1:10002  HEALTHY  outbound|9080|v2|reviews.shop.svc.cluster.local"}},
		{"listeners", []string{"0.0.0.0_9080  0.0.0.0  9080"}},
	} {
		var out, errOut bytes.Buffer
		cmd := proxyconfig.New(cli.Streams{Out: &out, Err: &errOut})
		cmd.SetArgs([]string{tc.kind, "--admin-addr", ln.Addr().String()})
		if err := cmd.Execute(); err != nil {
			t.Fatalf("%s: %v", tc.kind, err)
		}
		for _, w := range tc.want {
			if !strings.Contains(out.String(), w) {
				t.Errorf("%s output lacks %q:\n%s", tc.kind, w, out.String())
			}
		}
	}
	var out bytes.Buffer
	cmd := proxyconfig.New(cli.Streams{Out: &out, Err: &out})
	cmd.SetArgs([]string{"pods", "x", "--admin-addr", ln.Addr().String()})
	if err := cmd.Execute(); err == nil || !strings.Contains(err.Error(), `resource type "pods"`) {
		t.Errorf("bad kind: %v", err)
	}
}
