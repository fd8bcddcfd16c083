package xds

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l7"
	"github.com/meshlet/meshlet/proxy/xds/xdstest"
)

// bigMesh returns n services on port 9080 (one virtual host each in route
// configuration "9080", one EDS cluster with two endpoints each), as
// meshlet discovery sends them.
func bigMesh(n int) map[resource.Type][]types.Resource {
	rs := map[resource.Type][]types.Resource{}
	rc := &routev3.RouteConfiguration{Name: "9080"}
	for i := range n {
		m := xdstest.Mesh{Host: fmt.Sprintf("svc-%d.ns.svc.cluster.local", i), Port: 9080, VIP: fmt.Sprintf("10.96.%d.%d", i/250, i%250+1),
			Subsets: map[string][]string{"": {fmt.Sprintf("127.0.%d.%d:8080", i/250, i%250+1), fmt.Sprintf("127.1.%d.%d:8080", i/250, i%250+1)}},
			Weights: map[string]uint32{"": 100}}
		one := m.Resources()
		rs[resource.ClusterType] = append(rs[resource.ClusterType], one[resource.ClusterType]...)
		rs[resource.EndpointType] = append(rs[resource.EndpointType], one[resource.EndpointType]...)
		rc.VirtualHosts = append(rc.VirtualHosts, one[resource.RouteType][0].(*routev3.RouteConfiguration).VirtualHosts[0])
		if i == 0 {
			rs[resource.ListenerType] = one[resource.ListenerType]
		}
	}
	rs[resource.RouteType] = []types.Resource{rc}
	return rs
}

// nopSender answers nothing (the benchmark drives handle directly).
type nopSender struct{}

func (nopSender) subscribe(string, []string, []string, bool) error { return nil }
func (nopSender) reply(*response, string, string) error            { return nil }

func sotwResponse(t string, version string, list []types.Resource) *response {
	r := &response{typeURL: t, version: version, nonce: version, full: true}
	for _, m := range list {
		a, _ := anypb.New(m.(proto.Message))
		r.resources = append(r.resources, namedResource{version: version, raw: a})
	}
	return r
}

func benchClient(b testing.TB, n int) (*Client, map[resource.Type][]types.Resource, *l7.Engine) {
	eng, err := l7.New(config.L7{}, l7.Options{AccessLog: io.Discard, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { eng.Close() })
	c, err := New(Options{Address: "unused:1", Node: testIdentity.Node(), Engine: EngineApplier(eng)})
	if err != nil {
		b.Fatal(err)
	}
	rs := bigMesh(n)
	for _, t := range []string{ClusterType, EndpointType, ListenerType, RouteType} {
		if err := c.handle(sotwResponse(t, "0", rs[t]), nopSender{}, nil); err != nil {
			b.Fatal(err)
		}
	}
	if c.Ready() != nil {
		b.Fatalf("not ready: %v (nacks %v)", c.Ready(), c.Status().LastNACK)
	}
	return c, rs, eng
}

// anyOf marshals m.
func anyOf(b *testing.B, m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		b.Fatal(err)
	}
	return a
}

// processCPU is the process's user and system CPU time so far.
func processCPU() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// measure starts the timer and returns what stops it: it reports cpu-ns/op,
// the process's CPU per update (the collector's share included), the
// steadier figure on a shared machine.
func measure(b *testing.B) func() {
	b.ReportAllocs()
	runtime.GC() // the set-up's garbage is not the updates'
	b.ResetTimer()
	start := processCPU()
	return func() {
		b.StopTimer()
		b.ReportMetric(float64(processCPU()-start)/float64(b.N), "cpu-ns/op")
	}
}

// received is a as the client receives it: its own copy of the bytes (gRPC
// decodes every response into new buffers).
func received(a *anypb.Any) *anypb.Any {
	return &anypb.Any{TypeUrl: a.TypeUrl, Value: bytes.Clone(a.Value)}
}

// BenchmarkUpdate measures the time from an xDS response to the new
// table serving (decode, contract check, translation, assembly, engine
// compile and swap) and its allocations, for meshes of 10, 1,000 and
// 10,000 services (a cluster with two endpoints each), and the process's
// CPU per update (cpu-ns/op). The resources are marshaled before the timer
// starts; each update gets its own copy of their bytes, as from the wire:
//   - rds: the route configuration of every service, where one weight
//     changes (one RouteConfiguration with n virtual hosts, as SotW sends
//     it; delta sends the same one resource);
//   - eds: one cluster's endpoints change (delta: one resource; the
//     engine's endpoint path);
//   - cds: every cluster is re-sent (SotW) with one changed.
func BenchmarkUpdate(b *testing.B) {
	for _, n := range []int{10, 1000, 10000} {
		b.Run(fmt.Sprintf("rds/services=%d", n), func(b *testing.B) {
			c, rs, _ := benchClient(b, n)
			var alt [2]*anypb.Any
			for k := range alt {
				rc := proto.Clone(rs[resource.RouteType][0].(proto.Message)).(*routev3.RouteConfiguration)
				rc.VirtualHosts[0].Routes[0].GetRoute().GetWeightedClusters().Clusters[0].Weight = wrapperspb.UInt32(uint32(101 - k))
				alt[k] = anyOf(b, rc)
			}
			stop := measure(b)
			for i := range b.N {
				v := strconv.Itoa(i + 1)
				r := &response{typeURL: RouteType, version: v, nonce: v, full: true, resources: []namedResource{{version: v, raw: received(alt[i%2])}}}
				if err := c.handle(r, nopSender{}, nil); err != nil {
					b.Fatal(err)
				}
			}
			stop()
			if _, ok := c.Status().LastNACK["rds"]; ok {
				b.Fatalf("NACK: %v", c.Status().LastNACK)
			}
		})
		b.Run(fmt.Sprintf("eds/services=%d", n), func(b *testing.B) {
			c, rs, _ := benchClient(b, n)
			cla0 := rs[resource.EndpointType][0].(*endpointv3.ClusterLoadAssignment)
			alt := [2]*anypb.Any{anyOf(b, xdstest.CLA(cla0.ClusterName, "127.2.0.1:8080", "127.2.0.2:8080", "127.2.0.3:8080")), anyOf(b, cla0)}
			stop := measure(b)
			for i := range b.N {
				r := &response{typeURL: EndpointType, nonce: "n", resources: []namedResource{{name: cla0.ClusterName, version: strconv.Itoa(i), raw: received(alt[i%2])}}}
				if err := c.handle(r, nopSender{}, nil); err != nil {
					b.Fatal(err)
				}
			}
			stop()
			if _, ok := c.Status().LastNACK["eds"]; ok {
				b.Fatalf("NACK: %v", c.Status().LastNACK)
			}
		})
		b.Run(fmt.Sprintf("cds/services=%d", n), func(b *testing.B) {
			c, rs, _ := benchClient(b, n)
			list := make([]*anypb.Any, len(rs[resource.ClusterType]))
			for k, m := range rs[resource.ClusterType] {
				list[k] = anyOf(b, m.(proto.Message))
			}
			cl := proto.Clone(rs[resource.ClusterType][0].(proto.Message)).(*clusterv3.Cluster)
			cl.LbPolicy = clusterv3.Cluster_LEAST_REQUEST
			alt := [2]*anypb.Any{anyOf(b, cl), list[0]}
			stop := measure(b)
			for i := range b.N {
				v := strconv.Itoa(i + 1)
				r := &response{typeURL: ClusterType, version: v, nonce: v, full: true, resources: make([]namedResource, len(list))}
				for k, a := range list {
					if k == 0 {
						a = alt[i%2]
					}
					r.resources[k] = namedResource{version: v, raw: received(a)}
				}
				if err := c.handle(r, nopSender{}, nil); err != nil {
					b.Fatal(err)
				}
			}
			stop()
			if _, ok := c.Status().LastNACK["cds"]; ok {
				b.Fatalf("NACK: %v", c.Status().LastNACK)
			}
		})
	}
}

// BenchmarkProxyPSS runs the real meshlet binary as a proxy generation
// (go build ./cmd/meshlet) with the default configuration, and in xDS mode
// with 1,000 services from a real ADS server, and reports each process's
// proportional set size once ready (PSS-MiB). One iteration is enough.
func BenchmarkProxyPSS(b *testing.B) {
	bin := filepath.Join(b.TempDir(), "meshlet")
	out, err := exec.Command("go", "build", "-o", bin, "github.com/meshlet/meshlet/cmd/meshlet").CombinedOutput()
	if err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	for _, tc := range []struct {
		name     string
		services int
	}{{"default", 0}, {"xds-services=1000", 1000}} {
		b.Run(tc.name, func(b *testing.B) {
			for range b.N {
				b.ReportMetric(proxyPSS(b, bin, tc.services), "PSS-MiB")
			}
		})
	}
}

func proxyPSS(b *testing.B, bin string, services int) float64 {
	admin := proctest.FreePort(b)
	args := []string{"proxy", "--outbound-addr", proctest.FreePort(b), "--inbound-addr", "", "--health-addr", proctest.FreePort(b),
		"--prometheus-addr", proctest.FreePort(b), "--admin-addr", admin}
	env := append(os.Environ(), "POD_NAME=bench-0", "POD_NAMESPACE=shop", "INSTANCE_IP=127.0.0.1", "SERVICE_ACCOUNT=bench")
	if services > 0 {
		srv := xdstest.StartServer(b, "", testIdentity.NodeID())
		srv.Set(b, "1", bigMesh(services))
		args = append(args, "--discovery-address", srv.Addr, "--xds-state-file", filepath.Join(b.TempDir(), "state"))
		env = append(env, "POD_NAME=client-0")
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stderr = io.Discard
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	defer func() { _ = cmd.Process.Kill(); _ = cmd.Wait() }()
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + admin + "/server_info")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if services == 0 || strings.Contains(string(body), `"ready": true`) {
				break
			}
		}
		if time.Now().After(deadline) {
			b.Fatal("the proxy did not become ready")
		}
		time.Sleep(50 * time.Millisecond)
	}
	time.Sleep(2 * time.Second) // let the collector run after start-up
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", cmd.Process.Pid))
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if fields := strings.Fields(sc.Text()); len(fields) >= 2 && fields[0] == "Pss:" {
			kb, _ := strconv.ParseFloat(fields[1], 64)
			return kb / 1024
		}
	}
	b.Fatal("no Pss in smaps_rollup")
	return 0
}
