package l7

import (
	"fmt"
	"io"
	"log/slog"
	"testing"

	"github.com/meshlet/meshlet/proxy/config"
)

// BenchmarkEngineUpdate is the engine's share of a configuration push:
// Update with n services, each routing to its own two-endpoint cluster,
// where one route's weights change (so every cluster is carried over and
// every route recompiled, as after an RDS update).
func BenchmarkEngineUpdate(b *testing.B) {
	for _, n := range []int{10, 1000} {
		b.Run(fmt.Sprintf("services=%d", n), func(b *testing.B) {
			cfg := config.L7{}
			for i := range n {
				name := fmt.Sprintf("svc%d", i)
				cfg.Services = append(cfg.Services, config.Service{Name: name, Hosts: []string{name + ".ns.svc.cluster.local"},
					Ports: []config.PortConfig{{Port: 8080, Name: "http"}},
					Routes: []config.Route{{Name: "default", Destinations: []config.Destination{
						{Cluster: name, Subset: "v1", Weight: 90}, {Cluster: name, Subset: "v2", Weight: 10}}}}})
				cfg.Clusters = append(cfg.Clusters, config.Cluster{Name: name,
					Endpoints: []config.Endpoint{
						{Address: fmt.Sprintf("10.%d.%d.1:8080", i/250, i%250), Labels: map[string]string{"version": "v1"}},
						{Address: fmt.Sprintf("10.%d.%d.2:8080", i/250, i%250), Labels: map[string]string{"version": "v2"}}},
					Subsets: []config.Subset{{Name: "v1", Labels: map[string]string{"version": "v1"}}, {Name: "v2", Labels: map[string]string{"version": "v2"}}}})
			}
			p, err := New(cfg, Options{AccessLog: io.Discard, Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { p.Close() })
			b.ReportAllocs()
			b.ResetTimer()
			for i := range b.N {
				cfg.Services[0].Routes[0].Destinations[0].Weight = 90 + uint32(i%2)
				if err := p.Update(cfg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
