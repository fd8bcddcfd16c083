package xds

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7"
	"github.com/meshlet/meshlet/proxy/xds/xdstest"
)

// BenchmarkLatencyDuringUpdates is the issue's "p99 during a weight change
// every second vs no changes, same run": the real engine configured by the
// xDS client with 1,000 services (one RouteConfiguration of 1,000 virtual
// hosts, SotW), 4 keep-alive HTTP/1.1 clients sending requests through it
// to a real loopback backend (service 0), for b.N seconds — in "steady"
// nothing changes, in "rds-every-1s" a RouteConfiguration with another
// weight (of service 1, so the traffic's own split stays the same) arrives
// every second. It reports the requests' latency p50, p99 and maximum (µs)
// and the update time; nothing is asserted. Run with -benchtime 10x for 10
// seconds per case.
func BenchmarkLatencyDuringUpdates(b *testing.B) {
	be := startBackend(b, "be")
	for _, tc := range []struct {
		name    string
		updates bool
	}{{"steady", false}, {"rds-every-1s", true}} {
		b.Run(tc.name, func(b *testing.B) {
			eng, err := l7.New(config.L7{}, l7.Options{AccessLog: io.Discard, Dial: loopbackDial, Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { eng.Close() })
			c, err := New(Options{Address: "unused:1", Node: testIdentity.Node(), Engine: EngineApplier(eng)})
			if err != nil {
				b.Fatal(err)
			}
			rs := bigMesh(1000)
			cla := rs[resource.EndpointType][0].(interface{ GetClusterName() string })
			rs[resource.EndpointType] = append([]types.Resource{xdstest.CLA(cla.GetClusterName(), be.addr)}, rs[resource.EndpointType][1:]...)
			for _, t := range []string{ClusterType, EndpointType, ListenerType, RouteType} {
				if err := c.handle(sotwResponse(t, "0", rs[t]), nopSender{}, nil); err != nil {
					b.Fatal(err)
				}
			}
			if err := c.Ready(); err != nil {
				b.Fatal(err)
			}
			var alt [2]*anypb.Any
			for k := range alt {
				rc := proto.Clone(rs[resource.RouteType][0].(proto.Message)).(*routev3.RouteConfiguration)
				rc.VirtualHosts[1].Routes[0].GetRoute().GetWeightedClusters().Clusters[0].Weight = wrapperspb.UInt32(uint32(101 - k))
				alt[k] = anyOf(b, rc)
			}

			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				b.Fatal(err)
			}
			defer ln.Close()
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			dst := netip.MustParseAddrPort("10.96.0.1:9080") // service 0's VIP and port
			go func() {
				for {
					conn, err := ln.Accept()
					if err != nil {
						return
					}
					go eng.ServeConn(ctx, conn, dst, l4.Outbound)
				}
			}()

			const clients = 4
			end := time.Now().Add(time.Duration(b.N) * time.Second)
			lat := make([][]time.Duration, clients)
			errs := make(chan error, clients)
			var wg sync.WaitGroup
			b.ResetTimer()
			for i := range clients {
				wg.Add(1)
				go func() {
					defer wg.Done()
					hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 1, DisableCompression: true}, Timeout: 10 * time.Second}
					defer hc.CloseIdleConnections()
					for time.Now().Before(end) {
						req, _ := http.NewRequest("GET", "http://"+ln.Addr().String()+"/", nil)
						req.Host = "svc-0.ns.svc.cluster.local:9080"
						t0 := time.Now()
						resp, err := hc.Do(req)
						if err == nil {
							_, err = io.Copy(io.Discard, resp.Body)
							resp.Body.Close()
							if err == nil && resp.StatusCode != 200 {
								err = fmt.Errorf("status %d", resp.StatusCode)
							}
						}
						if err != nil {
							errs <- err
							return
						}
						lat[i] = append(lat[i], time.Since(t0))
					}
				}()
			}
			var took []time.Duration
			if tc.updates {
				tick := time.NewTicker(time.Second)
				for n := 0; time.Now().Before(end); n++ {
					<-tick.C
					v := strconv.Itoa(n + 1)
					r := &response{typeURL: RouteType, version: v, nonce: v, full: true, resources: []namedResource{{version: v, raw: received(alt[n%2])}}}
					t0 := time.Now()
					if err := c.handle(r, nopSender{}, nil); err != nil {
						b.Fatal(err)
					}
					took = append(took, time.Since(t0))
				}
				tick.Stop()
			}
			wg.Wait()
			b.StopTimer()
			close(errs)
			for err := range errs {
				b.Fatalf("a request failed: %v", err)
			}
			if n, ok := c.Status().LastNACK["rds"]; ok {
				b.Fatalf("NACK: %v", n)
			}
			all := slices.Concat(lat...)
			slices.Sort(all)
			if len(all) == 0 {
				b.Fatal("no request completed")
			}
			q := func(p float64) float64 { return float64(all[int(p*float64(len(all)-1))].Microseconds()) }
			b.ReportMetric(q(0.5), "p50-µs")
			b.ReportMetric(q(0.99), "p99-µs")
			b.ReportMetric(float64(all[len(all)-1].Microseconds()), "max-µs")
			b.ReportMetric(float64(len(all))/float64(b.N), "req/s")
			if len(took) > 0 {
				slices.Sort(took)
				b.ReportMetric(float64(took[len(took)/2].Microseconds())/1000, "update-p50-ms")
			}
			b.ReportMetric(0, "ns/op")
		})
	}
}
