package xds_test

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	networking "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7"
	"github.com/meshlet/meshlet/proxy/xds"
	"github.com/meshlet/meshlet/webhook/discovery/server"
)

// TestEnvtestDiscovery runs the proxy's engine and xDS client against the
// real `meshlet discovery` server, itself watching a real kube-apiserver
// with Istio's CRDs: a Service, the EndpointSlices of two Deployments (v1,
// v2: loopback backends) and a 90/10 VirtualService. Real HTTP through
// the engine splits accordingly; the weights change to 10/90 under load
// from clients that never retry and the new split follows, nothing fails.
func TestEnvtestDiscovery(t *testing.T) {
	if testing.Short() {
		t.Skip("envtest tier: skipped with -short")
	}
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Skip("envtest tier: KUBEBUILDER_ASSETS is unset (test/bin/build-k8s.sh --print-dir)")
	}
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatalf("go list -m istio.io/api: %v", err)
	}
	crds := filepath.Join(strings.TrimSpace(string(out)), "kubernetes", "customresourcedefinitions.gen.yaml")
	env := &envtest.Environment{CRDInstallOptions: envtest.CRDInstallOptions{Paths: []string{crds}, ErrorIfPathMissing: true}}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("starting envtest: %v", err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	kube, ist := kubernetes.NewForConfigOrDie(cfg), istioclient.NewForConfigOrDie(cfg)
	srv, err := server.New(server.Options{XDSAddr: "127.0.0.1:0", MetricsAddr: "-", Replica: "discovery-0", Kube: kube, Istio: ist, Log: logr.Discard()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() { cancel(); <-done })
	select {
	case <-srv.Ready():
	case err := <-done:
		t.Fatalf("discovery stopped: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("discovery not ready after 60s")
	}

	// Two "Deployments": a pod IP each (the API server refuses loopback
	// endpoints), served by a loopback backend the test's dialer maps the
	// pod IP to; nothing is ever dialed off this machine.
	ips := map[string]string{"v1": "10.1.0.1", "v2": "10.1.0.2"}
	podNet := map[string]string{}
	for v, ip := range ips {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		podNet[ip+":9080"] = ln.Addr().String()
		hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			_, _ = io.Copy(io.Discard, r.Body)
			fmt.Fprint(w, v)
		})}
		go func() { _ = hs.Serve(ln) }()
		t.Cleanup(func() { _ = hs.Close() })
	}
	bg := context.Background()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	_, err = kube.CoreV1().Namespaces().Create(bg, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{})
	must(err)
	svc, err := kube.CoreV1().Services("shop").Create(bg, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "reviews"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "reviews"}, Ports: []corev1.ServicePort{{Name: "http", Port: 9080}}}}, metav1.CreateOptions{})
	must(err)
	for v, ip := range ips {
		p, err := kube.CoreV1().Pods("shop").Create(bg, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "reviews-" + v, Labels: map[string]string{"app": "reviews", "version": v}},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "reviews"}}}}, metav1.CreateOptions{})
		must(err)
		p.Status.PodIP, p.Status.PodIPs = ip, []corev1.PodIP{{IP: ip}}
		_, err = kube.CoreV1().Pods("shop").UpdateStatus(bg, p, metav1.UpdateOptions{})
		must(err)
		name, port, yes := "http", int32(9080), true
		_, err = kube.DiscoveryV1().EndpointSlices("shop").Create(bg, &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: "reviews-" + v, Labels: map[string]string{discoveryv1.LabelServiceName: "reviews"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port}},
			Endpoints: []discoveryv1.Endpoint{{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: &yes},
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: "reviews-" + v, Namespace: "shop"}}},
		}, metav1.CreateOptions{})
		must(err)
	}
	_, err = ist.NetworkingV1().DestinationRules("shop").Create(bg, &networkingv1.DestinationRule{ObjectMeta: metav1.ObjectMeta{Name: "reviews"},
		Spec: networking.DestinationRule{Host: "reviews", Subsets: []*networking.Subset{
			{Name: "v1", Labels: map[string]string{"version": "v1"}}, {Name: "v2", Labels: map[string]string{"version": "v2"}}}}}, metav1.CreateOptions{})
	must(err)
	vs := func(w1, w2 int32) networking.VirtualService {
		return networking.VirtualService{Hosts: []string{"reviews"}, Http: []*networking.HTTPRoute{{Route: []*networking.HTTPRouteDestination{
			{Destination: &networking.Destination{Host: "reviews", Subset: "v1"}, Weight: w1},
			{Destination: &networking.Destination{Host: "reviews", Subset: "v2"}, Weight: w2}}}}}
	}
	created, err := ist.NetworkingV1().VirtualServices("shop").Create(bg, &networkingv1.VirtualService{ObjectMeta: metav1.ObjectMeta{Name: "reviews"}, Spec: vs(90, 10)}, metav1.CreateOptions{})
	must(err)

	// The proxy: the real engine, its xDS client as a sidecar in shop.
	eng, err := l7.New(config.L7{}, l7.Options{AccessLog: io.Discard, Logger: slog.New(slog.DiscardHandler), Dial: func(ctx context.Context, _ l4.Direction, network, addr string) (net.Conn, error) {
		to, ok := podNet[addr]
		if !ok {
			return nil, fmt.Errorf("test dialer: %s is not a pod of the test", addr)
		}
		addr = to
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}})
	must(err)
	t.Cleanup(func() { eng.Close() })
	id := xds.Identity{PodName: "client-0", Namespace: "shop", IP: "127.0.0.1", ServiceAccount: "client", Labels: map[string]string{"app": "client"}}
	c, err := xds.New(xds.Options{Address: srv.XDSAddr().String(), Node: id.Node(), Engine: xds.EngineApplier(eng),
		BackoffInitial: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond})
	must(err)
	cctx, ccancel := context.WithCancel(context.Background())
	cdone := make(chan struct{})
	go func() { _ = c.Run(cctx); close(cdone) }()
	t.Cleanup(func() { ccancel(); <-cdone })
	if err := c.WaitReady(cctx, 30*time.Second); err != nil {
		t.Fatalf("%v (status %+v)", err, c.Status())
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	must(err)
	dst := netip.MustParseAddrPort(svc.Spec.ClusterIP + ":9080")
	go func() {
		for {
			conn, err := ln.Accept()
			if err != nil {
				return
			}
			go eng.ServeConn(cctx, conn, dst, l4.Outbound)
		}
	}()
	t.Cleanup(func() { ln.Close() })
	addr := ln.Addr().String()
	hc := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 16}, Timeout: 5 * time.Second}
	call := func() (string, error) {
		req, _ := http.NewRequest(http.MethodPost, "http://"+addr+"/", bytes.NewReader([]byte("x")))
		req.Host = "reviews.shop.svc.cluster.local:9080"
		resp, err := hc.Do(req)
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != 200 {
			return "", fmt.Errorf("status %d %s", resp.StatusCode, b)
		}
		return string(b), nil
	}
	count := func(n int) map[string]int {
		got := map[string]int{}
		for range n {
			b, err := call()
			if err != nil {
				d, _ := c.ConfigDump(false)
				t.Fatalf("request: %v (status %+v)\n%s", err, c.Status(), d)
			}
			got[b]++
		}
		return got
	}
	// The control plane pushes the reviews objects after it first
	// answered (debounced), and its informers may see the v1 and v2 pods,
	// slices and subsets in any order: wait until both subsets served (a
	// subset without endpoints yet answers 503 NC meanwhile).
	// Converged means: both subset clusters are active with their
	// endpoints (ConfigDump with EDS lists an endpoint's address only once
	// it arrived), nothing warms, and 20 calls in a row are answered.
	converged := func() bool {
		d, err := c.ConfigDump(true)
		if err != nil || len(c.Status().WarmingClusters) > 0 {
			return false
		}
		var dump struct {
			Configs []struct {
				Type     string `json:"@type"`
				Clusters []struct {
					Cluster struct {
						Name string `json:"name"`
					} `json:"cluster"`
				} `json:"dynamic_active_clusters"`
				Endpoints []struct {
					EndpointConfig struct {
						ClusterName string `json:"cluster_name"`
						Endpoints   []struct {
							LbEndpoints []json.RawMessage `json:"lb_endpoints"`
						} `json:"endpoints"`
					} `json:"endpoint_config"`
				} `json:"dynamic_endpoint_configs"`
			} `json:"configs"`
		}
		if json.Unmarshal(d, &dump) != nil {
			return false
		}
		active, withEndpoints := map[string]bool{}, map[string]bool{}
		for _, cfg := range dump.Configs {
			for _, cl := range cfg.Clusters {
				active[cl.Cluster.Name] = true
			}
			for _, e := range cfg.Endpoints {
				for _, l := range e.EndpointConfig.Endpoints {
					if len(l.LbEndpoints) > 0 {
						withEndpoints[e.EndpointConfig.ClusterName] = true
					}
				}
			}
		}
		for _, sub := range []string{"v1", "v2"} {
			name := "outbound|9080|" + sub + "|reviews.shop.svc.cluster.local"
			if !active[name] || !withEndpoints[name] {
				return false
			}
		}
		for range 20 {
			if _, err := call(); err != nil {
				return false
			}
		}
		return true
	}
	for deadline := time.Now().Add(30 * time.Second); ; {
		if converged() {
			break
		}
		if time.Now().After(deadline) {
			d, _ := c.ConfigDump(false)
			t.Fatalf("reviews never served (status %+v)\n%s", c.Status(), d)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if got := count(1000); got["v2"] < 60 || got["v2"] > 140 {
		t.Fatalf("90/10 split %v", got)
	}

	// 10/90 under load.
	var mu sync.Mutex
	var fails []error
	type res struct {
		at time.Time
		b  string
	}
	var results []res
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 20000; i++ {
				select {
				case <-stop:
					return
				default:
				}
				at := time.Now()
				b, err := call()
				mu.Lock()
				if err != nil {
					fails = append(fails, err)
				} else {
					results = append(results, res{at, b})
				}
				mu.Unlock()
			}
		}()
	}
	time.Sleep(200 * time.Millisecond)
	rds := c.Status().Versions["rds"]
	created.Spec = vs(10, 90)
	_, err = ist.NetworkingV1().VirtualServices("shop").Update(bg, created, metav1.UpdateOptions{})
	must(err)
	changed := time.Now()
	deadline := changed.Add(30 * time.Second)
	for c.Status().Versions["rds"] == rds {
		if time.Now().After(deadline) {
			t.Fatal("the route update never arrived")
		}
		time.Sleep(5 * time.Millisecond)
	}
	applied := time.Now()
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()
	if len(fails) > 0 {
		t.Fatalf("%d requests failed under the weight change, first: %v", len(fails), fails[0])
	}
	n, v2 := 0, 0
	for _, r := range results {
		if r.at.After(applied) {
			n++
			if r.b == "v2" {
				v2++
			}
		}
	}
	if n < 100 || float64(v2)/float64(n) < 0.8 {
		t.Errorf("after the change: v2 %d of %d", v2, n)
	}
	t.Logf("VirtualService update → serving: %v (debounce 100ms included); %d requests, none failed; after: v2 %d of %d",
		applied.Sub(changed), len(results), v2, n)
}
