package xds

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

var reviews = mesh{
	Host: "reviews.shop.svc.cluster.local", Port: 9080, VIP: "10.96.0.10",
	Subsets: map[string][]string{"v1": {"127.0.0.1:10001"}, "v2": {"127.0.0.1:10002"}},
	Weights: map[string]uint32{"v1": 90, "v2": 10},
}

// TestSubscribeAndApply: against a real go-control-plane ADS server, over
// delta and over state of the world, the client receives a service with a
// 90/10 split, waits for the endpoints of both clusters and the route
// configuration its listener names, and hands the engine one complete
// configuration.
func TestSubscribeAndApply(t *testing.T) {
	for _, p := range []Protocol{Delta, SotW} {
		t.Run(string(p), func(t *testing.T) {
			srv := startCP(t, "")
			srv.Set(t, "1", reviews.Resources())
			eng := newRecorder()
			c, _ := runClient(t, Options{Address: srv.Addr, Engine: eng, Protocol: p})
			select {
			case <-c.ReadyC():
			case <-time.After(10 * time.Second):
				t.Fatalf("not ready: %v", c.Ready())
			}
			cfg := eng.last()
			if len(cfg.Clusters) != 2 || len(cfg.Services) != 1 {
				t.Fatalf("applied %d clusters, %d services; want 2, 1: %+v", len(cfg.Clusters), len(cfg.Services), cfg)
			}
			svc := cfg.Services[0]
			if got := strings.Join(svc.Hosts, ","); got != "reviews.shop.svc.cluster.local" {
				t.Errorf("hosts %q", got)
			}
			if len(svc.Addresses) != 1 || svc.Addresses[0] != "10.96.0.10" || len(svc.Ports) != 1 || svc.Ports[0].Port != 9080 {
				t.Errorf("addresses %v ports %v", svc.Addresses, svc.Ports)
			}
			d := svc.Routes[0].Destinations
			if len(d) != 2 || d[0].Weight != 90 || d[1].Weight != 10 || d[0].Cluster != reviews.ClusterName("v1") {
				t.Errorf("destinations %+v", d)
			}
			for _, cl := range cfg.Clusters {
				if len(cl.Endpoints) != 1 {
					t.Errorf("cluster %s endpoints %+v", cl.Name, cl.Endpoints)
				}
			}
			st := c.Status()
			if !st.Connected || st.Protocol != p || st.Source != SourceControlPlane || !st.Ready || st.Versions["cds"] == "" {
				t.Errorf("status %+v", st)
			}
		})
	}
}

// TestNACKKeepsConfig: a cluster the proxy cannot apply (RING_HASH) is
// NACKed with a message naming the resource and the field, the engine
// keeps the previous configuration, and a later good version is applied.
func TestNACKKeepsConfig(t *testing.T) {
	for _, p := range []Protocol{Delta, SotW} {
		t.Run(string(p), func(t *testing.T) {
			srv := startCP(t, "")
			srv.Set(t, "1", reviews.Resources())
			eng := newRecorder()
			c, _ := runClient(t, Options{Address: srv.Addr, Engine: eng, Protocol: p})
			<-c.ReadyC()
			bad := reviews.Resources()
			bad[resource.ClusterType][0].(*clusterv3.Cluster).LbPolicy = clusterv3.Cluster_RING_HASH
			srv.Set(t, "2", bad)
			want := "Cluster outbound|9080|v1|reviews.shop.svc.cluster.local: lb_policy: RING_HASH is not supported"
			waitFor(t, "the NACK at the server", 5*time.Second, func() bool {
				for _, m := range srv.NACKs() {
					if strings.Contains(m, want) {
						return true
					}
				}
				return false
			})
			// The other types of version 2 may apply; the clusters stay.
			for _, cl := range eng.last().Clusters {
				if cl.LoadBalancer != "round_robin" {
					t.Errorf("cluster %s: load balancer %q after the NACK", cl.Name, cl.LoadBalancer)
				}
			}
			if st := c.Status(); st.LastNACK["cds"].Message == "" || !strings.Contains(st.LastNACK["cds"].Message, want) {
				t.Errorf("status lastNack %+v", st.LastNACK)
			}
			good := reviews.Resources()
			good[resource.ClusterType][0].(*clusterv3.Cluster).LbPolicy = clusterv3.Cluster_LEAST_REQUEST
			srv.Set(t, "3", good)
			waitFor(t, "version 3 applied", 5*time.Second, func() bool {
				for _, cl := range eng.last().Clusters {
					if cl.Name == reviews.ClusterName("v1") && cl.LoadBalancer == "least_request" {
						return true
					}
				}
				return false
			})
			if _, ok := c.Status().LastNACK["cds"]; ok {
				t.Errorf("lastNack kept after a good update")
			}
		})
	}
}

// TestWarming: a new cluster whose endpoints have not arrived is not in
// the table (its route answers NC) and the client is not ready; once they
// arrive it is.
func TestWarming(t *testing.T) {
	srv := startCP(t, "")
	rs := reviews.Resources()
	delete(rs, resource.EndpointType)
	srv.Set(t, "1", rs)
	eng := newRecorder()
	c, _ := runClient(t, Options{Address: srv.Addr, Engine: eng, Protocol: Delta})
	waitFor(t, "a first, warming configuration", 5*time.Second, func() bool {
		return len(c.Status().WarmingClusters) == 2 && len(eng.last().Services) == 1
	})
	if c.Ready() == nil {
		t.Fatal("ready while both clusters warm")
	}
	if cfg := eng.last(); len(cfg.Clusters) != 0 || len(cfg.Services) != 1 {
		t.Fatalf("warming clusters in the table: %+v", cfg.Clusters)
	}
	srv.Set(t, "2", reviews.Resources())
	select {
	case <-c.ReadyC():
	case <-time.After(5 * time.Second):
		t.Fatalf("not ready after the endpoints arrived: %v", c.Ready())
	}
	if len(eng.last().Clusters) != 2 {
		t.Fatalf("clusters %+v", eng.last().Clusters)
	}
}

// TestPersistedConfig: the last applied resources survive in the state
// file; a new client whose control plane is unreachable serves them at
// once, says so, and takes the control plane's update when it comes back
// (resubscribing with the versions it has).
func TestPersistedConfig(t *testing.T) {
	for _, p := range []Protocol{Delta, SotW} {
		t.Run(string(p), func(t *testing.T) {
			state := filepath.Join(t.TempDir(), "xds-state")
			srv := startCP(t, "")
			srv.Set(t, "1", reviews.Resources())
			eng := newRecorder()
			c, stop := runClient(t, Options{Address: srv.Addr, Engine: eng, Protocol: p, StateFile: state})
			<-c.ReadyC()
			stop() // writes the last state
			addr := srv.Addr
			srv.Stop()

			eng2 := newRecorder()
			c2, err := New(Options{Address: addr, Node: testIdentity.Node(), Engine: eng2, Protocol: p, StateFile: state,
				BackoffInitial: 20 * time.Millisecond, BackoffMax: 100 * time.Millisecond})
			if err != nil {
				t.Fatal(err)
			}
			ok, err := c2.LoadPersisted()
			if err != nil || !ok {
				t.Fatalf("LoadPersisted: %v, %v", ok, err)
			}
			if c2.Ready() != nil || c2.Status().Source != SourcePersisted {
				t.Fatalf("after LoadPersisted: ready %v, status %+v", c2.Ready(), c2.Status())
			}
			if cfg := eng2.last(); len(cfg.Clusters) != 2 || len(cfg.Services) != 1 {
				t.Fatalf("persisted config: %+v", cfg)
			}
			// The control plane comes back on the same address with a new split.
			srv2 := startCP(t, addr)
			m := reviews
			m.Weights = map[string]uint32{"v1": 50, "v2": 50}
			srv2.Set(t, "2", m.Resources())
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan struct{})
			go func() { _ = c2.Run(ctx); close(done) }()
			defer func() { cancel(); <-done }()
			waitFor(t, "the 50/50 split from the control plane", 10*time.Second, func() bool {
				cfg := eng2.last()
				return len(cfg.Services) == 1 && cfg.Services[0].Routes[0].Destinations[0].Weight == 50
			})
			if st := c2.Status(); st.Source != SourceControlPlane || !st.Connected {
				t.Errorf("status %+v", st)
			}
		})
	}
}
