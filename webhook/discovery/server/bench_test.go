package server

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	goruntime "runtime"
	"runtime/pprof"
	"slices"
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
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istiofake "istio.io/client-go/pkg/clientset/versioned/fake"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	kubefake "k8s.io/client-go/kubernetes/fake"
)

// benchClient is a light SotW ADS client (like dialADS, but it keeps only
// names and versions, so a thousand of them fit in one process). It ACKs
// every response at once and reports when each route configuration
// arrives, and when the endpoints of the watched cluster arrive (with how
// many endpoints it has).
type benchClient struct {
	stream discoverygrpc.AggregatedDiscoveryService_StreamAggregatedResourcesClient
}

// benchWatchedCLA is the cluster whose endpoints the clients report.
const benchWatchedCLA = "outbound|80||svc-0000.bench.svc.cluster.local"

func runBenchClient(ctx context.Context, conn *grpc.ClientConn, node *corev3.Node, rds func(time.Time), eds func(time.Time, int)) (*benchClient, error) {
	s, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return nil, err
	}
	c := &benchClient{stream: s}
	for _, typ := range []string{resourcev3.ClusterType, resourcev3.ListenerType} {
		if err := s.Send(&discoverygrpc.DiscoveryRequest{Node: node, TypeUrl: typ}); err != nil {
			return nil, err
		}
	}
	watched := []byte(benchWatchedCLA)
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
				if !slices.Equal(eds, names[resourcev3.EndpointType]) {
					names[resourcev3.EndpointType] = eds
					follow = &discoverygrpc.DiscoveryRequest{TypeUrl: resourcev3.EndpointType, ResourceNames: eds}
				}
			case resourcev3.ListenerType:
				var rds []string
				for _, a := range r.GetResources() {
					l := &listenerv3.Listener{}
					if a.UnmarshalTo(l) == nil {
						rds = append(rds, rdsNames(l)...)
					}
				}
				sort.Strings(rds)
				if !slices.Equal(rds, names[resourcev3.RouteType]) {
					names[resourcev3.RouteType] = rds
					follow = &discoverygrpc.DiscoveryRequest{TypeUrl: resourcev3.RouteType, ResourceNames: rds}
				}
			case resourcev3.EndpointType:
				// Decode only the watched assignment: a SotW EDS response
				// carries all of them.
				for _, a := range r.GetResources() {
					if !bytes.Contains(a.GetValue(), watched) {
						continue
					}
					cla := &endpointv3.ClusterLoadAssignment{}
					if a.UnmarshalTo(cla) == nil && cla.GetClusterName() == benchWatchedCLA {
						n := 0
						for _, le := range cla.GetEndpoints() {
							n += len(le.GetLbEndpoints())
						}
						eds(now, n)
					}
				}
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
				rds(now)
			}
		}
	}()
	return c, nil
}

// runBenchDeltaClient is runBenchClient over delta ADS (what the proxy's
// own xDS client speaks by default): CDS and LDS wildcard, EDS and RDS
// subscribed by name as they appear; every response ACKed.
func runBenchDeltaClient(ctx context.Context, conn *grpc.ClientConn, node *corev3.Node, rds func(time.Time), eds func(time.Time, int)) error {
	s, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).DeltaAggregatedResources(ctx)
	if err != nil {
		return err
	}
	for _, typ := range []string{resourcev3.ClusterType, resourcev3.ListenerType} {
		if err := s.Send(&discoverygrpc.DeltaDiscoveryRequest{Node: node, TypeUrl: typ}); err != nil {
			return err
		}
	}
	watched := []byte(benchWatchedCLA)
	go func() {
		subscribed := map[string]bool{}
		for {
			r, err := s.Recv()
			if err != nil {
				return
			}
			now := time.Now()
			typ := r.GetTypeUrl()
			var more []string
			dep := ""
			for _, res := range r.GetResources() {
				a := res.GetResource()
				switch typ {
				case resourcev3.ClusterType:
					cl := &clusterv3.Cluster{}
					if a.UnmarshalTo(cl) == nil && cl.GetType() == clusterv3.Cluster_EDS {
						more, dep = append(more, cl.GetEdsClusterConfig().GetServiceName()), resourcev3.EndpointType
					}
				case resourcev3.ListenerType:
					l := &listenerv3.Listener{}
					if a.UnmarshalTo(l) == nil {
						more, dep = append(more, rdsNames(l)...), resourcev3.RouteType
					}
				case resourcev3.EndpointType:
					if !bytes.Contains(a.GetValue(), watched) {
						continue
					}
					cla := &endpointv3.ClusterLoadAssignment{}
					if a.UnmarshalTo(cla) == nil && cla.GetClusterName() == benchWatchedCLA {
						n := 0
						for _, le := range cla.GetEndpoints() {
							n += len(le.GetLbEndpoints())
						}
						eds(now, n)
					}
				}
			}
			if err := s.Send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: typ, ResponseNonce: r.GetNonce()}); err != nil {
				return
			}
			var fresh []string
			for _, n := range more {
				if !subscribed[dep+n] {
					subscribed[dep+n] = true
					fresh = append(fresh, n)
				}
			}
			if len(fresh) > 0 {
				if err := s.Send(&discoverygrpc.DeltaDiscoveryRequest{TypeUrl: dep, ResourceNamesSubscribe: fresh}); err != nil {
					return
				}
			}
			if typ == resourcev3.RouteType {
				rds(now)
			}
		}
	}()
	return nil
}

// benchClientsEnv makes the test binary a process of simulated sidecars
// ("ADDR N SHAPES": N clients, their labels app=shape-K for K < SHAPES, so
// the server builds SHAPES distinct proxy shapes): the control plane's
// memory and CPU are then its own. The
// process prints "R i unixnano" when client i receives a route
// configuration and "E i unixnano n" when it receives the watched
// cluster's endpoints (n of them).
const benchClientsEnv = "MESHLET_BENCH_CLIENTS"

func runBenchClients(spec string) int {
	var addr string
	var n, shapes int
	if _, err := fmt.Sscan(spec, &addr, &n, &shapes); err != nil {
		fmt.Fprintln(os.Stderr, "bench clients:", err)
		return 2
	}
	var mu sync.Mutex
	out := bufio.NewWriter(os.Stdout)
	emit := func(format string, a ...any) {
		mu.Lock()
		fmt.Fprintf(out, format, a...)
		out.Flush()
		mu.Unlock()
	}
	ctx := context.Background()
	var conns []*grpc.ClientConn
	for range 10 {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64<<20)))
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench clients:", err)
			return 1
		}
		conns = append(conns, conn)
	}
	for i := range n {
		var meta map[string]any
		if shapes > 1 {
			meta = map[string]any{"LABELS": map[string]any{"app": fmt.Sprintf("shape-%d", i%shapes)}}
		}
		node := testNode(fmt.Sprintf("10.2.%d.%d", i/250, i%250+1), fmt.Sprintf("client-%d", i), "bench", meta)
		rds := func(t time.Time) { emit("R %d %d\n", i, t.UnixNano()) }
		eds := func(t time.Time, eps int) { emit("E %d %d %d\n", i, t.UnixNano(), eps) }
		var err error
		if os.Getenv("MESHLET_BENCH_DELTA") != "" {
			err = runBenchDeltaClient(ctx, conns[i%len(conns)], node, rds, eds)
		} else {
			_, err = runBenchClient(ctx, conns[i%len(conns)], node, rds, eds)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "bench clients:", err)
			return 1
		}
	}
	// Serve until the parent closes stdin (or dies).
	_, _ = io.Copy(io.Discard, os.Stdin)
	return 0
}

// heapBytes is the Go heap in use after a collection (steadier than RSS).
func heapBytes() int64 {
	goruntime.GC()
	goruntime.GC() // the second empties the pools the first moved aside
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

// benchMesh is one control plane with MESHLET_BENCH_SERVICES Services
// (default 1000, two endpoints each, port 80) on fake clientsets and
// MESHLET_BENCH_PROXIES simulated sidecars (default 1000, SotW ADS over
// loopback, in a child process, so this process's memory and CPU are the
// control plane's) in MESHLET_BENCH_SHAPES distinct label sets (default 1:
// one build per push serves them all); MESHLET_BENCH_DELTA=1 makes them
// delta clients. Both benchmarks share it (set up once per process).
type benchMesh struct {
	kube  *kubefake.Clientset
	istio *istiofake.Clientset
	vs    *networkingv1.VirtualService
	reg   *prometheus.Registry
	nSvc  int
	// rds and eds receive each client's reports (by client index).
	rds []chan time.Time
	eds []chan benchEDS
	// Memory: before the server, after it is ready, after every proxy got
	// its configuration.
	rss0, rss1, rss2, heap0, heap1, heap2 int64
	stdin                                 io.WriteCloser // of the clients' process
}

type benchEDS struct {
	at  time.Time
	eps int
}

var (
	benchOnce sync.Once
	bench     *benchMesh
	benchErr  error
)

func benchSetup(b *testing.B) *benchMesh {
	benchOnce.Do(func() { bench, benchErr = newBenchMesh() })
	if benchErr != nil {
		b.Fatal(benchErr)
	}
	return bench
}

func benchSlice(name string, i, n int) *discoveryv1.EndpointSlice {
	pn, port, yes := "http", int32(8080), true
	es := &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Name: name + "-1", Namespace: "bench",
		Labels: map[string]string{discoveryv1.LabelServiceName: name}}, AddressType: discoveryv1.AddressTypeIPv4,
		Ports: []discoveryv1.EndpointPort{{Name: &pn, Port: &port}}}
	for j := range n {
		es.Endpoints = append(es.Endpoints, discoveryv1.Endpoint{Addresses: []string{fmt.Sprintf("10.%d.%d.%d", 1+j/2, i/125, 2*(i%125)+1+j%2)},
			Conditions: discoveryv1.EndpointConditions{Ready: &yes}})
	}
	return es
}

func newBenchMesh() (*benchMesh, error) {
	// The fake clientsets serve no watch-list bookmarks: plain LIST + WATCH.
	os.Setenv("KUBE_FEATURE_WatchListClient", "false")
	nSvc, nProxy := envInt("MESHLET_BENCH_SERVICES", 1000), envInt("MESHLET_BENCH_PROXIES", 1000)
	m := &benchMesh{nSvc: nSvc}
	m.rss0, m.heap0 = rssBytes(), heapBytes()
	var kobjs []runtime.Object
	kobjs = append(kobjs, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "bench"}})
	for i := range nSvc {
		name := fmt.Sprintf("svc-%04d", i)
		ip := fmt.Sprintf("10.96.%d.%d", i/250, i%250+1)
		kobjs = append(kobjs, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "bench"},
			Spec: corev1.ServiceSpec{ClusterIP: ip, ClusterIPs: []string{ip}, Ports: []corev1.ServicePort{{Name: "http", Port: 80}}}},
			benchSlice(name, i, 2))
	}
	m.kube = kubefake.NewClientset(kobjs...)
	vs := reviewsVS(90, 10)
	vs.Namespace = "bench"
	vs.Spec.Hosts = []string{"svc-0000"}
	for _, h := range vs.Spec.Http {
		for _, r := range h.Route {
			r.Destination.Host, r.Destination.Subset = "svc-0000", ""
		}
	}
	vs.Spec.Http[1].Route[1].Destination.Host = "svc-0001"
	m.vs = vs
	m.istio = istiofake.NewSimpleClientset(vs)
	m.reg = prometheus.NewRegistry()
	srv, err := New(Options{XDSAddr: "127.0.0.1:0", MetricsAddr: "-", Kube: m.kube, Istio: m.istio, Registry: m.reg, Log: logr.Discard()})
	if err != nil {
		return nil, err
	}
	go srv.Run(context.Background()) // until the process ends
	<-srv.Ready()
	m.rss1, m.heap1 = rssBytes(), heapBytes()

	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), fmt.Sprintf("%s=%s %d %d", benchClientsEnv, srv.XDSAddr(), nProxy, envInt("MESHLET_BENCH_SHAPES", 1)))
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	// The child serves until its stdin closes: when this process ends.
	if m.stdin, err = cmd.StdinPipe(); err != nil {
		return nil, err
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	m.rds, m.eds = make([]chan time.Time, nProxy), make([]chan benchEDS, nProxy)
	for i := range nProxy {
		m.rds[i], m.eds[i] = make(chan time.Time, 64), make(chan benchEDS, 64)
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			var kind string
			var i, eps int
			var ns int64
			if n, _ := fmt.Sscan(sc.Text(), &kind, &i, &ns, &eps); n < 3 || i < 0 || i >= nProxy {
				continue
			}
			switch kind {
			case "R":
				m.rds[i] <- time.Unix(0, ns)
			case "E":
				m.eds[i] <- benchEDS{time.Unix(0, ns), eps}
			}
		}
	}()
	for i := range nProxy {
		select {
		case <-m.rds[i]:
		case <-time.After(5 * time.Minute):
			return nil, fmt.Errorf("client %d never got its first route configuration", i)
		}
	}
	time.Sleep(time.Second) // let any trailing initial push land, then forget it
	m.drain()
	m.rss2, m.heap2 = rssBytes(), heapBytes()
	return m, nil
}

func (m *benchMesh) drain() {
	for i := range m.rds {
		for len(m.rds[i]) > 0 {
			<-m.rds[i]
		}
		for len(m.eds[i]) > 0 {
			<-m.eds[i]
		}
	}
}

// await collects, for every proxy, how long after t0 it got what done
// accepts from its channel.
func await[T any](b *testing.B, chans []chan T, t0 time.Time, at func(T) time.Time, done func(T) bool) []time.Duration {
	lat := make([]time.Duration, len(chans))
	var wg sync.WaitGroup
	var failed atomic.Int32
	for j, c := range chans {
		wg.Add(1)
		go func() {
			defer wg.Done()
			timeout := time.After(2 * time.Minute)
			for {
				select {
				case v := <-c:
					if done(v) {
						lat[j] = at(v).Sub(t0)
						return
					}
				case <-timeout:
					failed.Add(1)
					return
				}
			}
		}()
	}
	wg.Wait()
	if failed.Load() > 0 {
		b.Fatalf("%d proxies never converged", failed.Load())
	}
	return lat
}

// benchProfile starts a CPU profile of the benchmark after the shared
// setup (-cpuprofile also holds the thousand proxies connecting) when
// MESHLET_BENCH_CPUPROFILE names a file prefix: PREFIX.NAME.pprof, the
// last run of the benchmark. The returned function stops it.
func benchProfile(b *testing.B) func() {
	prefix := os.Getenv("MESHLET_BENCH_CPUPROFILE")
	if prefix == "" {
		return func() {}
	}
	f, err := os.Create(prefix + "." + strings.TrimPrefix(b.Name(), "Benchmark") + ".pprof")
	if err != nil {
		b.Fatal(err)
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		f.Close()
		b.Fatal(err)
	}
	return func() {
		pprof.StopCPUProfile()
		if err := f.Close(); err != nil {
			b.Error(err)
		}
	}
}

func (m *benchMesh) report(b *testing.B, all []time.Duration, cpu time.Duration, pushSum0 float64, pushN0 uint64) {
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	pushSum, pushN := histogramSum(m.reg, "meshlet_discovery_push_duration_seconds")
	b.ReportMetric(float64(all[len(all)/2].Milliseconds()), "p50-ms")
	b.ReportMetric(float64(all[len(all)*99/100].Milliseconds()), "p99-ms")
	if pushN > pushN0 {
		b.ReportMetric((pushSum-pushSum0)/float64(pushN-pushN0)*1000, "push-ms")
	}
	b.ReportMetric(float64(cpu.Milliseconds())/float64(b.N), "cpu-ms/push")
	b.ReportMetric(float64(m.heap1-m.heap0)/float64(m.nSvc)/1024, "heap-KiB/service")
	b.ReportMetric(float64(m.heap2-m.heap1)/float64(len(m.rds))/1024, "heap-KiB/proxy")
	b.ReportMetric(float64(m.rss2-m.rss1)/float64(len(m.rds))/1024, "rss-KiB/proxy")
	b.ReportMetric(float64(m.rss2)/(1<<20), "rss-MiB")
}

// BenchmarkConvergence: each iteration changes the benchMesh's
// VirtualService's weights and waits until every proxy received (and
// ACKed) the new route configuration. Reports p50/p99 convergence, the
// server's push time (compile + build + snapshots), the control plane's CPU
// per push (this process: server, informers and fake clientsets; the
// clients run in another), its Go heap per Service and per proxy (deltas
// after a GC; the fake clientsets' copies of the objects are included)
// and RSS per proxy and in all.
func BenchmarkConvergence(b *testing.B) {
	m := benchSetup(b)
	ctx := context.Background()
	m.drain()
	var all []time.Duration
	var cpu time.Duration
	pushSum0, pushN0 := histogramSum(m.reg, "meshlet_discovery_push_duration_seconds")
	defer benchProfile(b)()
	b.ResetTimer()
	for i := range b.N {
		cur, err := m.istio.NetworkingV1().VirtualServices("bench").Get(ctx, m.vs.Name, metav1.GetOptions{})
		if err != nil {
			b.Fatal(err)
		}
		// 11..90: never the initial 10, never the current weight.
		w := 11 + (cur.Spec.Http[1].Route[1].Weight-10+int32(i))%80
		cur.Spec.Http[1].Route[0].Weight, cur.Spec.Http[1].Route[1].Weight = 100-w, w
		c0, t0 := cpuTime(), time.Now()
		if _, err := m.istio.NetworkingV1().VirtualServices("bench").Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
			b.Fatal(err)
		}
		lat := await(b, m.rds, t0, func(t time.Time) time.Time { return t }, func(time.Time) bool { return true })
		cpu += cpuTime() - c0
		all = append(all, lat...)
	}
	b.StopTimer()
	m.report(b, all, cpu, pushSum0, pushN0)
}

// BenchmarkEndpointChurn: each iteration scales svc-0000 from one endpoint
// to 50 (a Deployment scaled 1 → 50: one EndpointSlice update) and waits
// until every proxy received the assignment with 50 endpoints; the way
// back to one endpoint is not timed. Reports what BenchmarkConvergence
// does, for the EDS push.
func BenchmarkEndpointChurn(b *testing.B) {
	m := benchSetup(b)
	ctx := context.Background()
	esc := m.kube.DiscoveryV1().EndpointSlices("bench")
	set := func(n int) time.Time {
		t0 := time.Now()
		if _, err := esc.Update(ctx, benchSlice("svc-0000", 0, n), metav1.UpdateOptions{}); err != nil {
			b.Fatal(err)
		}
		return t0
	}
	at := func(e benchEDS) time.Time { return e.at }
	var all []time.Duration
	var cpu time.Duration
	var pushSum0 float64
	var pushN0 uint64
	defer benchProfile(b)()
	b.ResetTimer()
	for i := range b.N {
		b.StopTimer()
		m.drain()
		await(b, m.eds, set(1), at, func(e benchEDS) bool { return e.eps == 1 })
		m.drain()
		if i == 0 {
			pushSum0, pushN0 = histogramSum(m.reg, "meshlet_discovery_push_duration_seconds")
		}
		b.StartTimer()
		c0 := cpuTime()
		lat := await(b, m.eds, set(50), at, func(e benchEDS) bool { return e.eps == 50 })
		cpu += cpuTime() - c0
		all = append(all, lat...)
	}
	b.StopTimer()
	m.report(b, all, cpu, pushSum0, pushN0)
}
