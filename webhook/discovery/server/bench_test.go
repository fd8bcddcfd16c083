package server

import (
	"context"
	"fmt"
	"os"
	goruntime "runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	istiofake "istio.io/client-go/pkg/clientset/versioned/fake"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kubefake "k8s.io/client-go/kubernetes/fake"
)

// benchClient is a light SotW ADS client (like dialADS, but it keeps only
// names and versions, so a thousand of them fit in one process). It records
// when each RDS response arrives; it ACKs every response at once.
type benchClient struct {
	stream discoverygrpc.AggregatedDiscoveryService_StreamAggregatedResourcesClient
	rds    chan time.Time
}

func runBenchClient(ctx context.Context, conn *grpc.ClientConn, node *corev3.Node) (*benchClient, error) {
	s, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return nil, err
	}
	c := &benchClient{stream: s, rds: make(chan time.Time, 16)}
	for _, typ := range []string{resourcev3.ClusterType, resourcev3.ListenerType} {
		if err := s.Send(&discoverygrpc.DiscoveryRequest{Node: node, TypeUrl: typ}); err != nil {
			return nil, err
		}
	}
	go func() {
		names := map[string][]string{}
		for {
			r, err := s.Recv()
			if err != nil {
				return
			}
			now := time.Now()
			typ := r.GetTypeUrl()
			var follow *discoverygrpc.DiscoveryRequest
			switch typ {
			case resourcev3.ClusterType:
				var eds []string
				for _, a := range r.GetResources() {
					cl := &clusterv3.Cluster{}
					if a.UnmarshalTo(cl) == nil && cl.GetType() == clusterv3.Cluster_EDS {
						eds = append(eds, cl.GetEdsClusterConfig().GetServiceName())
					}
				}
				sort.Strings(eds)
				names[resourcev3.EndpointType] = eds
				follow = &discoverygrpc.DiscoveryRequest{TypeUrl: resourcev3.EndpointType, ResourceNames: eds}
			case resourcev3.ListenerType:
				var rds []string
				for _, a := range r.GetResources() {
					l := &listenerv3.Listener{}
					if a.UnmarshalTo(l) == nil {
						rds = append(rds, rdsNames(l)...)
					}
				}
				sort.Strings(rds)
				names[resourcev3.RouteType] = rds
				follow = &discoverygrpc.DiscoveryRequest{TypeUrl: resourcev3.RouteType, ResourceNames: rds}
			}
			if err := s.Send(&discoverygrpc.DiscoveryRequest{TypeUrl: typ, VersionInfo: r.GetVersionInfo(),
				ResponseNonce: r.GetNonce(), ResourceNames: names[typ]}); err != nil {
				return
			}
			if follow != nil {
				if err := s.Send(follow); err != nil {
					return
				}
			}
			if typ == resourcev3.RouteType {
				c.rds <- now
			}
		}
	}()
	return c, nil
}

// heapBytes is the Go heap in use after a collection (steadier than RSS).
func heapBytes() int64 {
	goruntime.GC()
	var ms goruntime.MemStats
	goruntime.ReadMemStats(&ms)
	return int64(ms.HeapInuse)
}

func rssBytes() int64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, "VmRSS:") {
			f := strings.Fields(line)
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func histogramSum(reg *prometheus.Registry, name string) (float64, uint64) {
	mfs, _ := reg.Gather()
	for _, mf := range mfs {
		if mf.GetName() == name {
			h := mf.GetMetric()[0].GetHistogram()
			return h.GetSampleSum(), h.GetSampleCount()
		}
	}
	return 0, 0
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

// BenchmarkConvergence: MESHLET_BENCH_SERVICES Services (default 1000, two
// endpoints each) and MESHLET_BENCH_PROXIES simulated sidecars (default
// 1000, SotW ADS over loopback, in this process); each iteration changes a
// VirtualService's weights and waits until every proxy received (and
// ACKed) the new route configuration. Reports p50/p99 convergence, the
// server's push time (build + snapshots), process CPU per push, and Go heap
// per Service and per proxy (process deltas after a GC: they include the
// fake clientsets' copies and the simulated clients' streams, so they are
// upper bounds for the server), and the process RSS.
func BenchmarkConvergence(b *testing.B) {
	// The fake clientsets serve no watch-list bookmarks: plain LIST + WATCH.
	os.Setenv("KUBE_FEATURE_WatchListClient", "false")
	nSvc, nProxy := envInt("MESHLET_BENCH_SERVICES", 1000), envInt("MESHLET_BENCH_PROXIES", 1000)
	rss0, heap0 := rssBytes(), heapBytes()
	var kobjs []runtime.Object
	kobjs = append(kobjs, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "bench"}})
	for i := range nSvc {
		name := fmt.Sprintf("svc-%04d", i)
		kobjs = append(kobjs, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "bench"},
			Spec: corev1.ServiceSpec{ClusterIP: fmt.Sprintf("10.96.%d.%d", i/250, i%250+1), ClusterIPs: []string{fmt.Sprintf("10.96.%d.%d", i/250, i%250+1)},
				Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}})
		pn, port, yes := "http", int32(8080), true
		kobjs = append(kobjs, &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Name: name + "-1", Namespace: "bench",
			Labels: map[string]string{discoveryv1.LabelServiceName: name}}, AddressType: discoveryv1.AddressTypeIPv4,
			Ports: []discoveryv1.EndpointPort{{Name: &pn, Port: &port}},
			Endpoints: []discoveryv1.Endpoint{
				{Addresses: []string{fmt.Sprintf("10.1.%d.%d", i/125, 2*(i%125)+1)}, Conditions: discoveryv1.EndpointConditions{Ready: &yes}},
				{Addresses: []string{fmt.Sprintf("10.1.%d.%d", i/125, 2*(i%125)+2)}, Conditions: discoveryv1.EndpointConditions{Ready: &yes}}}})
	}
	kube := kubefake.NewClientset(kobjs...)
	vs := reviewsVS(90, 10)
	vs.Namespace = "bench"
	vs.Spec.Hosts = []string{"svc-0000"}
	for _, h := range vs.Spec.Http {
		for _, r := range h.Route {
			r.Destination.Host, r.Destination.Subset = "svc-0000", ""
		}
	}
	vs.Spec.Http[1].Route[1].Destination.Host = "svc-0001"
	istio := istiofake.NewSimpleClientset(vs)
	reg := prometheus.NewRegistry()
	srv, err := New(Options{XDSAddr: "127.0.0.1:0", MetricsAddr: "-", Kube: kube, Istio: istio, Registry: reg, Log: logr.Discard()})
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go srv.Run(ctx)
	<-srv.Ready()
	rss1, heap1 := rssBytes(), heapBytes()

	var conns []*grpc.ClientConn
	for range 10 {
		conn, err := grpc.NewClient(srv.XDSAddr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		conns = append(conns, conn)
	}
	clients := make([]*benchClient, nProxy)
	for i := range nProxy {
		c, err := runBenchClient(ctx, conns[i%len(conns)], testNode(fmt.Sprintf("10.2.%d.%d", i/250, i%250+1), fmt.Sprintf("client-%d", i), "bench", nil))
		if err != nil {
			b.Fatal(err)
		}
		clients[i] = c
	}
	for _, c := range clients {
		select {
		case <-c.rds:
		case <-time.After(5 * time.Minute):
			b.Fatal("a client never got its first route configuration")
		}
	}
	rss2, heap2 := rssBytes(), heapBytes()
	_, _ = rss1, rss2
	time.Sleep(time.Second) // let any trailing initial push land, then forget it
	for _, c := range clients {
		for len(c.rds) > 0 {
			<-c.rds
		}
	}

	var all []time.Duration
	var cpu time.Duration
	pushSum0, pushN0 := histogramSum(reg, "meshlet_discovery_push_duration_seconds")
	b.ResetTimer()
	for i := range b.N {
		cur, err := istio.NetworkingV1().VirtualServices("bench").Get(ctx, vs.Name, metav1.GetOptions{})
		if err != nil {
			b.Fatal(err)
		}
		w := int32(11 + i%80) // never the initial 10
		cur.Spec.Http[1].Route[0].Weight, cur.Spec.Http[1].Route[1].Weight = 100-w, w
		c0, t0 := cpuTime(), time.Now()
		if _, err := istio.NetworkingV1().VirtualServices("bench").Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			b.Fatal(err)
		}
		var wg sync.WaitGroup
		var lat = make([]time.Duration, nProxy)
		var failed atomic.Int32
		for j, c := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				select {
				case t := <-c.rds:
					lat[j] = t.Sub(t0)
				case <-time.After(2 * time.Minute):
					failed.Add(1)
				}
			}()
		}
		wg.Wait()
		cpu += cpuTime() - c0
		if failed.Load() > 0 {
			b.Fatalf("%d proxies never converged", failed.Load())
		}
		all = append(all, lat...)
	}
	b.StopTimer()
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	pushSum, pushN := histogramSum(reg, "meshlet_discovery_push_duration_seconds")
	b.ReportMetric(float64(all[len(all)/2].Milliseconds()), "p50-ms")
	b.ReportMetric(float64(all[len(all)*99/100].Milliseconds()), "p99-ms")
	if pushN > pushN0 {
		b.ReportMetric((pushSum-pushSum0)/float64(pushN-pushN0)*1000, "push-ms")
	}
	b.ReportMetric(float64(cpu.Milliseconds())/float64(b.N), "cpu-ms/push")
	b.ReportMetric(float64(heap1-heap0)/float64(nSvc)/1024, "heap-KiB/service")
	b.ReportMetric(float64(heap2-heap1)/float64(nProxy)/1024, "heap-KiB/proxy")
	b.ReportMetric(float64(rss0)/(1<<20), "rss0-MiB")
	b.ReportMetric(float64(rssBytes())/(1<<20), "rss-MiB")
}
