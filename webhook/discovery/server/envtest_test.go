package server

import (
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/go-logr/logr/testr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	networking "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

func envtestSkip(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("envtest tier: skipped with -short")
	}
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Skip("envtest tier: KUBEBUILDER_ASSETS is unset (test/bin/build-k8s.sh --print-dir)")
	}
}

// istioCRDs is Istio's CRD file from the istio.io/api module.
func istioCRDs(t testing.TB) string {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatalf("go list -m istio.io/api: %v", err)
	}
	return filepath.Join(strings.TrimSpace(string(out)), "kubernetes", "customresourcedefinitions.gen.yaml")
}

// testCluster is a real kube-apiserver with Istio's CRDs and a running
// discovery server.
type testCluster struct {
	cfg   *rest.Config
	kube  kubernetes.Interface
	istio istioclient.Interface
	srv   *Server
}

func startCluster(t *testing.T) *testCluster {
	t.Helper()
	envtestSkip(t)
	env := &envtest.Environment{CRDInstallOptions: envtest.CRDInstallOptions{Paths: []string{istioCRDs(t)}, ErrorIfPathMissing: true}}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("starting envtest: %v", err)
	}
	t.Cleanup(func() { env.Stop() })
	c := &testCluster{cfg: cfg, kube: kubernetes.NewForConfigOrDie(cfg), istio: istioclient.NewForConfigOrDie(cfg)}
	srv, err := New(Options{XDSAddr: "127.0.0.1:0", MetricsAddr: "127.0.0.1:0", Replica: "discovery-0",
		Kube: c.kube, Istio: c.istio, Log: testr.NewWithOptions(t, testr.Options{Verbosity: 0})})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("server: %v", err)
		}
	})
	select {
	case <-srv.Ready():
	case err := <-done:
		t.Fatalf("server stopped before ready: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("server not ready after 60s")
	}
	c.srv = srv
	return c
}

// startReplica runs another discovery replica on the same API server until
// the test ends.
func (c *testCluster) startReplica(t *testing.T, name string) *Server {
	t.Helper()
	srv, err := New(Options{XDSAddr: "127.0.0.1:0", MetricsAddr: "-", Replica: name,
		Kube: c.kube, Istio: c.istio, Log: testr.NewWithOptions(t, testr.Options{Verbosity: 0})})
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
		t.Fatalf("replica %s stopped before ready: %v", name, err)
	case <-time.After(60 * time.Second):
		t.Fatalf("replica %s not ready after 60s", name)
	}
	return srv
}

func mustCreate[T any](t testing.TB, create func(context.Context, T, metav1.CreateOptions) (T, error), obj T) T {
	t.Helper()
	out, err := create(context.Background(), obj, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating %T: %v", obj, err)
	}
	return out
}

func (c *testCluster) seedShop(t testing.TB) {
	t.Helper()
	ctx := context.Background()
	mustCreate(t, c.kube.CoreV1().Namespaces().Create, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}})
	mustCreate(t, c.kube.CoreV1().Services("shop").Create, &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "reviews"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "reviews"}, Ports: []corev1.ServicePort{{Name: "http", Port: 9080}}}})
	for _, v := range []string{"v1", "v2"} {
		p := mustCreate(t, c.kube.CoreV1().Pods("shop").Create, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "reviews-" + v, Labels: map[string]string{"app": "reviews", "version": v}},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "reviews"}}}})
		ip := map[string]string{"v1": "10.1.0.1", "v2": "10.1.0.2"}[v]
		p.Status.PodIP, p.Status.PodIPs = ip, []corev1.PodIP{{IP: ip}}
		if _, err := c.kube.CoreV1().Pods("shop").UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	mustCreate(t, c.kube.DiscoveryV1().EndpointSlices("shop").Create, reviewsSlice(false))
}

func reviewsSlice(v2Ready bool) *discoveryv1.EndpointSlice {
	name, port, yes, no := "http", int32(9080), true, false
	ready := &yes
	if !v2Ready {
		ready = &no
	}
	return &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "reviews-1", Labels: map[string]string{discoveryv1.LabelServiceName: "reviews"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.1.0.1"}, Conditions: discoveryv1.EndpointConditions{Ready: &yes},
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: "reviews-v1", Namespace: "shop"}},
			{Addresses: []string{"10.1.0.2"}, Conditions: discoveryv1.EndpointConditions{Ready: ready, Serving: &yes, Terminating: &yes},
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Name: "reviews-v2", Namespace: "shop"}},
		},
	}
}

const reviewsFQDN = "reviews.shop.svc.cluster.local"

func reviewsVS(w1, w2 int32) *networkingv1.VirtualService {
	return &networkingv1.VirtualService{ObjectMeta: metav1.ObjectMeta{Name: "reviews"}, Spec: networking.VirtualService{
		Hosts: []string{"reviews"},
		Http: []*networking.HTTPRoute{
			{Match: []*networking.HTTPMatchRequest{{Headers: map[string]*networking.StringMatch{"end-user": {MatchType: &networking.StringMatch_Exact{Exact: "jason"}}}}},
				Route: []*networking.HTTPRouteDestination{{Destination: &networking.Destination{Host: "reviews", Subset: "v2"}}}},
			{Route: []*networking.HTTPRouteDestination{
				{Destination: &networking.Destination{Host: "reviews", Subset: "v1"}, Weight: w1},
				{Destination: &networking.Destination{Host: "reviews", Subset: "v2"}, Weight: w2}}},
		}}}
}

func reviewsDR() *networkingv1.DestinationRule {
	return &networkingv1.DestinationRule{ObjectMeta: metav1.ObjectMeta{Name: "reviews"}, Spec: networking.DestinationRule{
		Host: "reviews",
		Subsets: []*networking.Subset{
			{Name: "v1", Labels: map[string]string{"version": "v1"}},
			{Name: "v2", Labels: map[string]string{"version": "v2"}}}}}
}

func routeOf(m map[string]proto.Message, port, vhost string) *routev3.VirtualHost {
	rc, _ := m[port].(*routev3.RouteConfiguration)
	for _, vh := range rc.GetVirtualHosts() {
		if vh.GetName() == vhost {
			return vh
		}
	}
	return nil
}

func weights(vh *routev3.VirtualHost) map[string]uint32 {
	out := map[string]uint32{}
	for _, r := range vh.GetRoutes() {
		for _, w := range r.GetRoute().GetWeightedClusters().GetClusters() {
			out[w.GetName()] = w.GetWeight().GetValue()
		}
	}
	return out
}

// TestEnvtestADS drives the control plane through a real API server with
// Istio's CRDs and checks what a raw SotW ADS client (and a delta one) is
// sent: endpoints with their health, a VirtualService split with subsets,
// its update and deletion, a refused VirtualService (Event, others still
// served), a NACK recorded per type, pushes only to affected proxies, a
// ServiceEntry, and an invalid node id.
func TestEnvtestADS(t *testing.T) {
	c := startCluster(t)
	ctx := context.Background()
	c.seedShop(t)
	addr := c.srv.XDSAddr().String()
	vhost := reviewsFQDN + ":9080"

	var nackRDS atomicString
	client := dialADS(t, addr, testNode("10.0.0.100", "sleep", "shop", nil), func(typ string, _ *discoverygrpc.DiscoveryResponse) string {
		if typ == resourcev3.RouteType {
			return nackRDS.Load()
		}
		return ""
	})

	t.Run("endpoints", func(t *testing.T) {
		cl := "outbound|9080||" + reviewsFQDN
		client.waitFor(t, resourcev3.EndpointType, "two reviews endpoints, v2 draining", func(m map[string]proto.Message) bool {
			cla, _ := m[cl].(*endpointv3.ClusterLoadAssignment)
			eps := cla.GetEndpoints()
			if len(eps) != 1 || len(eps[0].GetLbEndpoints()) != 2 {
				return false
			}
			return eps[0].GetLbEndpoints()[0].GetHealthStatus() == corev3.HealthStatus_HEALTHY &&
				eps[0].GetLbEndpoints()[1].GetHealthStatus() == corev3.HealthStatus_DRAINING
		})
		client.waitFor(t, resourcev3.RouteType, "the default route", func(m map[string]proto.Message) bool {
			vh := routeOf(m, "9080", vhost)
			return vh != nil && vh.GetRoutes()[0].GetRoute().GetCluster() == cl && vh.GetRoutes()[0].GetRoute().GetRetryPolicy().GetNumRetries().GetValue() == 2
		})
	})

	t.Run("virtualservice split, update, delete", func(t *testing.T) {
		mustCreate(t, c.istio.NetworkingV1().DestinationRules("shop").Create, reviewsDR())
		vs := mustCreate(t, c.istio.NetworkingV1().VirtualServices("shop").Create, reviewsVS(90, 10))
		client.waitFor(t, resourcev3.RouteType, "the 90/10 split", func(m map[string]proto.Message) bool {
			w := weights(routeOf(m, "9080", vhost))
			return w["outbound|9080|v1|"+reviewsFQDN] == 90 && w["outbound|9080|v2|"+reviewsFQDN] == 10
		})
		client.waitFor(t, resourcev3.EndpointType, "the v2 subset's endpoints", func(m map[string]proto.Message) bool {
			cla, _ := m["outbound|9080|v2|"+reviewsFQDN].(*endpointv3.ClusterLoadAssignment)
			return len(cla.GetEndpoints()) == 1 && len(cla.GetEndpoints()[0].GetLbEndpoints()) == 1 &&
				cla.GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress().GetAddress() == "10.1.0.2"
		})
		vs.Spec = *reviewsVS(50, 50).Spec.DeepCopy()
		if _, err := c.istio.NetworkingV1().VirtualServices("shop").Update(ctx, vs, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		client.waitFor(t, resourcev3.RouteType, "the 50/50 split", func(m map[string]proto.Message) bool {
			w := weights(routeOf(m, "9080", vhost))
			return w["outbound|9080|v1|"+reviewsFQDN] == 50 && w["outbound|9080|v2|"+reviewsFQDN] == 50
		})
		if err := c.istio.NetworkingV1().VirtualServices("shop").Delete(ctx, "reviews", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		client.waitFor(t, resourcev3.RouteType, "the default route again", func(m map[string]proto.Message) bool {
			vh := routeOf(m, "9080", vhost)
			return vh != nil && len(vh.GetRoutes()) == 1 && vh.GetRoutes()[0].GetName() == "default"
		})
	})

	t.Run("endpoint update", func(t *testing.T) {
		es, err := c.kube.DiscoveryV1().EndpointSlices("shop").Get(ctx, "reviews-1", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		es.Endpoints = reviewsSlice(true).Endpoints[:1]
		if _, err := c.kube.DiscoveryV1().EndpointSlices("shop").Update(ctx, es, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		client.waitFor(t, resourcev3.EndpointType, "one reviews endpoint, v2 subset empty", func(m map[string]proto.Message) bool {
			all, _ := m["outbound|9080||"+reviewsFQDN].(*endpointv3.ClusterLoadAssignment)
			v2, _ := m["outbound|9080|v2|"+reviewsFQDN].(*endpointv3.ClusterLoadAssignment)
			return v2 != nil && len(v2.GetEndpoints()) == 0 && len(all.GetEndpoints()) == 1 && len(all.GetEndpoints()[0].GetLbEndpoints()) == 1
		})
	})

	t.Run("refused virtualservice is an event, others are served", func(t *testing.T) {
		bad := reviewsVS(90, 10)
		bad.Name = "reviews-cors"
		bad.Spec.Http[1].CorsPolicy = &networking.CorsPolicy{AllowOrigins: []*networking.StringMatch{{MatchType: &networking.StringMatch_Exact{Exact: "https://x"}}}}
		created := mustCreate(t, c.istio.NetworkingV1().VirtualServices("shop").Create, bad)
		good := reviewsVS(70, 30)
		mustCreate(t, c.istio.NetworkingV1().VirtualServices("shop").Create, good)
		client.waitFor(t, resourcev3.RouteType, "the good VirtualService's 70/30", func(m map[string]proto.Message) bool {
			return weights(routeOf(m, "9080", vhost))["outbound|9080|v1|"+reviewsFQDN] == 70
		})
		deadline := time.Now().Add(20 * time.Second)
		for {
			evs, err := c.kube.CoreV1().Events("shop").List(ctx, metav1.ListOptions{FieldSelector: fields.Set{
				"involvedObject.name": "reviews-cors", "involvedObject.kind": "VirtualService"}.String()})
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for _, e := range evs.Items {
				if e.Reason == "UnsupportedField" && e.Type == corev1.EventTypeWarning && strings.Contains(e.Message, "spec.http[1].corsPolicy") &&
					e.InvolvedObject.UID == created.UID && e.Source.Component == EventComponent {
					found = true
				}
			}
			if found {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("no UnsupportedField Event naming spec.http[1].corsPolicy on VirtualService reviews-cors; events: %+v", evs.Items)
			}
			time.Sleep(100 * time.Millisecond)
		}

		// A second replica refuses the same VirtualService: still one Event.
		c.startReplica(t, "discovery-1")
		time.Sleep(3 * time.Second) // its broadcaster writes asynchronously
		evs, err := c.kube.CoreV1().Events("shop").List(ctx, metav1.ListOptions{FieldSelector: fields.Set{
			"involvedObject.name": "reviews-cors", "involvedObject.kind": "VirtualService"}.String()})
		if err != nil {
			t.Fatal(err)
		}
		if len(evs.Items) != 1 {
			t.Fatalf("two replicas recorded %d Events for one refused VirtualService, want 1: %+v", len(evs.Items), evs.Items)
		}
	})

	t.Run("nack is recorded per type", func(t *testing.T) {
		nackRDS.Store("RouteConfiguration 9080: virtual_hosts[0].routes[0].route.hash_policy: not supported")
		before := client.responses(resourcev3.RouteType)
		vs, err := c.istio.NetworkingV1().VirtualServices("shop").Get(ctx, "reviews", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		vs.Spec.Http[1].Route[0].Weight, vs.Spec.Http[1].Route[1].Weight = 60, 40
		if _, err := c.istio.NetworkingV1().VirtualServices("shop").Update(ctx, vs, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitStatus(t, c, func(st []ProxyStatus) bool {
			rds := findType(st, client.node.GetId(), resourcev3.RouteType)
			return rds != nil && rds.State == StateNACK && strings.Contains(rds.Error, "hash_policy") &&
				findType(st, client.node.GetId(), resourcev3.ClusterType).State == StateSynced
		})
		if client.responses(resourcev3.RouteType) <= before {
			t.Fatal("the RDS update never arrived")
		}
		// The same document over HTTP, as proxy-status reads it.
		resp, err := http.Get("http://" + c.srv.MetricsAddr().String() + "/debug/syncz")
		if err != nil {
			t.Fatal(err)
		}
		var doc SyncStatus
		if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if rds := findType(doc.Proxies, client.node.GetId(), resourcev3.RouteType); doc.Replica != "discovery-0" || rds.GetState() != StateNACK || !strings.Contains(rds.Error, "hash_policy") {
			t.Fatalf("/debug/syncz: %+v", doc)
		}
		nackRDS.Store("")
		vs, err = c.istio.NetworkingV1().VirtualServices("shop").Get(ctx, "reviews", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		vs.Spec.Http[1].Route[0].Weight, vs.Spec.Http[1].Route[1].Weight = 80, 20
		if _, err := c.istio.NetworkingV1().VirtualServices("shop").Update(ctx, vs, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitStatus(t, c, func(st []ProxyStatus) bool {
			rds := findType(st, client.node.GetId(), resourcev3.RouteType)
			return rds != nil && rds.State == StateSynced && rds.Error == ""
		})
		if n := client.repeatedNACKed(); n > 0 {
			t.Fatalf("the server sent a rejected version again %d times (NACK loop)", n)
		}
	})

	t.Run("only affected proxies are pushed", func(t *testing.T) {
		mustCreate(t, c.kube.CoreV1().Namespaces().Create, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "other"}})
		mustCreate(t, c.istio.NetworkingV1().Sidecars("other").Create, &networkingv1.Sidecar{ObjectMeta: metav1.ObjectMeta{Name: "default"},
			Spec: networking.Sidecar{Egress: []*networking.IstioEgressListener{{Hosts: []string{"./*"}}}}})
		other := dialADS(t, addr, testNode("10.0.0.200", "lonely", "other", nil), nil)
		other.waitFor(t, resourcev3.ClusterType, "the other proxy's clusters, scoped by its Sidecar", func(m map[string]proto.Message) bool {
			return m["PassthroughCluster"] != nil && m["outbound|9080||"+reviewsFQDN] == nil
		})
		waitStatus(t, c, func(st []ProxyStatus) bool {
			l := findType(st, other.node.GetId(), resourcev3.ListenerType)
			return l != nil && l.State == StateSynced
		})
		waitSynced(t, c, other.node.GetId())
		otherBefore := sentVersions(c.srv.Status(), other.node.GetId())
		otherSnapshot := snapshotVersions(c, other.node.GetId())
		otherResponses := other.totalResponses()
		pushesBefore := c.srv.pushes.Load()
		vs, err := c.istio.NetworkingV1().VirtualServices("shop").Get(ctx, "reviews", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		vs.Spec.Http[1].Route[0].Weight, vs.Spec.Http[1].Route[1].Weight = 10, 90
		if _, err := c.istio.NetworkingV1().VirtualServices("shop").Update(ctx, vs, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		client.waitFor(t, resourcev3.RouteType, "the 10/90 split", func(m map[string]proto.Message) bool {
			return weights(routeOf(m, "9080", vhost))["outbound|9080|v1|"+reviewsFQDN] == 10
		})
		// Wait for the push that reached client to complete; the other proxy was not sent anything.
		for c.srv.pushes.Load() == pushesBefore {
			time.Sleep(10 * time.Millisecond)
		}
		if v := snapshotVersions(c, other.node.GetId()); v != otherSnapshot {
			t.Fatalf("a change in shop set a new snapshot for a proxy scoped to namespace other: %s -> %s", otherSnapshot, v)
		}
		if n := other.totalResponses(); n != otherResponses {
			t.Fatalf("a change in shop sent %d responses to a proxy scoped to namespace other", n-otherResponses)
		}
		if after := sentVersions(c.srv.Status(), other.node.GetId()); after != otherBefore {
			t.Fatalf("a change in shop pushed to a proxy scoped to namespace other: %s -> %s", otherBefore, after)
		}
	})

	t.Run("serviceentry", func(t *testing.T) {
		mustCreate(t, c.istio.NetworkingV1().ServiceEntries("shop").Create, &networkingv1.ServiceEntry{ObjectMeta: metav1.ObjectMeta{Name: "payments"},
			Spec: networking.ServiceEntry{Hosts: []string{"payments.example.com"}, Location: networking.ServiceEntry_MESH_EXTERNAL,
				Resolution: networking.ServiceEntry_STATIC, Ports: []*networking.ServicePort{{Number: 443, Name: "https", Protocol: "HTTPS"}},
				Endpoints: []*networking.WorkloadEntry{{Address: "192.0.2.1"}}}})
		client.waitFor(t, resourcev3.EndpointType, "the ServiceEntry's endpoint", func(m map[string]proto.Message) bool {
			cla, _ := m["outbound|443||payments.example.com"].(*endpointv3.ClusterLoadAssignment)
			return len(cla.GetEndpoints()) == 1 && cla.GetEndpoints()[0].GetLbEndpoints()[0].GetEndpoint().GetAddress().GetSocketAddress().GetPortValue() == 443
		})
	})

	t.Run("delta", func(t *testing.T) {
		d := dialDelta(t, addr, testNode("10.0.0.101", "sleep2", "shop", nil))
		first := d.recv(t, resourcev3.ClusterType)
		if !first.has("outbound|9080||" + reviewsFQDN) {
			t.Fatalf("delta CDS lacks the reviews cluster: %v", first.names)
		}
		d.ack(t, first)
		if err := c.kube.CoreV1().Services("shop").Delete(ctx, "reviews", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		for {
			r := d.recv(t, resourcev3.ClusterType)
			d.ack(t, r)
			if r.removed["outbound|9080||"+reviewsFQDN] {
				if r.has("outbound|443||payments.example.com") {
					t.Fatal("delta resent an unchanged cluster")
				}
				break
			}
		}
		waitStatus(t, c, func(st []ProxyStatus) bool {
			cds := findType(st, d.node.GetId(), resourcev3.ClusterType)
			return cds != nil && cds.State == StateSynced
		})
	})

	t.Run("invalid node id", func(t *testing.T) {
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		s, err := discoverygrpc.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := s.Send(&discoverygrpc.DiscoveryRequest{Node: &corev3.Node{Id: "router~x"}, TypeUrl: resourcev3.ClusterType}); err != nil {
			t.Fatal(err)
		}
		_, err = s.Recv()
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "node.id") {
			t.Fatalf("want InvalidArgument naming node.id, got %v", err)
		}
	})
}

type atomicString struct {
	mu sync.Mutex
	s  string
}

func (a *atomicString) Load() string   { a.mu.Lock(); defer a.mu.Unlock(); return a.s }
func (a *atomicString) Store(s string) { a.mu.Lock(); defer a.mu.Unlock(); a.s = s }

func findType(st []ProxyStatus, id, typ string) *TypeStatus {
	for _, p := range st {
		if p.ID == id {
			return p.Types[typ]
		}
	}
	return nil
}

// GetState is nil-safe for test messages.
func (t *TypeStatus) GetState() string {
	if t == nil {
		return ""
	}
	return t.State
}

func sentVersions(st []ProxyStatus, id string) string {
	var parts []string
	for _, typ := range TypeNames {
		if ts := findType(st, id, typ); ts != nil {
			parts = append(parts, ts.Sent)
		}
	}
	return strings.Join(parts, ",")
}

func waitStatus(t testing.TB, c *testCluster, pred func([]ProxyStatus) bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !pred(c.srv.Status()) {
		if time.Now().After(deadline) {
			b, _ := json.MarshalIndent(c.srv.Status(), "", " ")
			t.Fatalf("status never matched:\n%s", b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

var _ = clusterv3.Cluster_EDS

// snapshotVersions are the versions of the snapshot the cache holds for a node.
func snapshotVersions(c *testCluster, id string) string {
	snap, err := c.srv.sidecar.GetSnapshot(id)
	if err != nil {
		return err.Error()
	}
	var parts []string
	for _, typ := range TypeNames {
		parts = append(parts, snap.GetVersion(typ))
	}
	return strings.Join(parts, ",")
}

// waitSynced waits until the node acknowledged every type of the snapshot
// the cache holds for it (nothing in flight).
func waitSynced(t testing.TB, c *testCluster, id string) {
	t.Helper()
	waitStatus(t, c, func(st []ProxyStatus) bool {
		want := strings.Split(snapshotVersions(c, id), ",")
		for i, typ := range TypeNames {
			ts := findType(st, id, typ)
			if ts == nil || ts.Acked != want[i] || ts.Sent != want[i] {
				return false
			}
		}
		return true
	})
}
