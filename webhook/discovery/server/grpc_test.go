package server

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	_ "google.golang.org/grpc/xds" // the xds:/// resolver and balancers
	networking "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/webhook/discovery/translate"
)

const grpcHost = "reviews.shop.example"

// grpcBackend is a real gRPC server (the standard health service) that
// names itself in a response header.
func grpcBackend(t *testing.T, addr, name string) net.Listener {
	t.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer(grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
		grpc.SetHeader(ctx, metadata.Pairs("backend", name))
		return h(ctx, req)
	}))
	healthpb.RegisterHealthServer(s, health.NewServer())
	go s.Serve(lis)
	t.Cleanup(s.Stop)
	return lis
}

// TestEnvtestProxylessGRPC: grpc-go's own xDS client (xds:/// resolver,
// bootstrap from GRPC_XDS_BOOTSTRAP_CONFIG, node metadata GENERATOR grpc)
// against the real server: a 90/10 split over 1000 calls, a header match to
// v2, a DestinationRule subset change that moves traffic, and a deleted
// VirtualService that returns to the default route.
func TestEnvtestProxylessGRPC(t *testing.T) {
	c := startCluster(t)
	ctx := context.Background()
	v1 := grpcBackend(t, "127.0.0.11:0", "v1")
	port := v1.Addr().(*net.TCPAddr).Port
	grpcBackend(t, fmt.Sprintf("127.0.0.12:%d", port), "v2")

	// Kubernetes refuses loopback addresses in EndpointSlices, so the two
	// backends on this machine are a ServiceEntry's STATIC endpoints.
	mustCreate(t, c.kube.CoreV1().Namespaces().Create, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}})
	mustCreate(t, c.istio.NetworkingV1().ServiceEntries("shop").Create, &networkingv1.ServiceEntry{ObjectMeta: metav1.ObjectMeta{Name: "reviews"},
		Spec: networking.ServiceEntry{Hosts: []string{grpcHost}, Location: networking.ServiceEntry_MESH_INTERNAL,
			Resolution: networking.ServiceEntry_STATIC, Ports: []*networking.ServicePort{{Number: 9080, Name: "grpc", Protocol: "GRPC", TargetPort: uint32(port)}},
			Endpoints: []*networking.WorkloadEntry{
				{Address: "127.0.0.11", Labels: map[string]string{"version": "v1"}},
				{Address: "127.0.0.12", Labels: map[string]string{"version": "v2"}}}}})
	dr := reviewsDR()
	dr.Spec.Host = grpcHost
	mustCreate(t, c.istio.NetworkingV1().DestinationRules("shop").Create, dr)
	vs := reviewsVS(90, 10)
	vs.Spec.Hosts = []string{grpcHost}
	for _, h := range vs.Spec.Http {
		for _, r := range h.Route {
			r.Destination.Host = grpcHost
		}
	}
	mustCreate(t, c.istio.NetworkingV1().VirtualServices("shop").Create, vs)
	// The client's first answer must already hold the VirtualService.
	deadline := time.Now().Add(20 * time.Second)
	for {
		res := c.srv.mesh.Load().ForProxy(translate.Proxy{IP: "10.0.0.50", Name: "client", Namespace: "shop", Generator: translate.GeneratorGRPC})
		if len(res.Routes) == 1 && len(res.Routes[0].GetVirtualHosts()[0].GetRoutes()) == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the VirtualService never reached the compiled mesh")
		}
		time.Sleep(10 * time.Millisecond)
	}

	// grpc-go reads GRPC_XDS_BOOTSTRAP_CONFIG when it starts, so the client
	// is this test binary re-executed with it set (see TestMain).
	bootstrap := fmt.Sprintf(`{
  "xds_servers": [{"server_uri": %q, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
  "node": {"id": "sidecar~10.0.0.50~client.shop~shop.svc.cluster.local",
           "metadata": {"GENERATOR": "grpc", "NAMESPACE": "shop", "NAME": "client"}}
}`, c.srv.XDSAddr().String())
	client := startGRPCClient(t, "xds:///"+grpcHost+":9080", bootstrap)
	callN := func(n int, user string) map[string]int {
		t.Helper()
		counts, err := client.calls(n, user)
		if err != nil {
			t.Fatalf("calls through xds:///: %v", err)
		}
		return counts
	}
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for !ok() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
		}
	}

	t.Run("90/10 split over 1000 calls", func(t *testing.T) {
		counts := callN(1000, "")
		if counts["v1"] < 860 || counts["v1"] > 940 {
			t.Fatalf("v1 got %d of 1000 calls (v2 %d), want 900 ± 40", counts["v1"], counts["v2"])
		}
		t.Logf("v1 %d, v2 %d of 1000", counts["v1"], counts["v2"])
	})
	t.Run("header match routes to v2", func(t *testing.T) {
		if counts := callN(50, "jason"); counts["v2"] != 50 {
			t.Fatalf("end-user: jason reached %v, want only v2", counts)
		}
	})
	t.Run("subset change moves traffic", func(t *testing.T) {
		dr, err := c.istio.NetworkingV1().DestinationRules("shop").Get(ctx, "reviews", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		dr.Spec.Subsets[0] = &networking.Subset{Name: "v1", Labels: map[string]string{"version": "v2"}}
		if _, err := c.istio.NetworkingV1().DestinationRules("shop").Update(ctx, dr, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitFor("subset v1 to select the v2 endpoint", func() bool {
			counts, err := client.calls(50, "")
			return err == nil && counts["v2"] == 50
		})
	})
	t.Run("deleted virtualservice returns to the default route", func(t *testing.T) {
		if err := c.istio.NetworkingV1().VirtualServices("shop").Delete(ctx, "reviews", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		// The default cluster holds both endpoints (round robin); the VirtualService sent everything to v2.
		// grpc-go may fail an RPC while it switches to a cluster it has not
		// loaded yet ("unknown cluster selected"); retry until v1 answers.
		waitFor("v1 to be reached again", func() bool {
			counts, err := client.calls(20, "")
			return err == nil && counts["v1"] > 0
		})
	})
}

// grpcClient is a child process (this test binary) running grpc-go's xDS
// client; it answers "N USER" lines with the JSON counts of backends.
type grpcClient struct {
	in  io.WriteCloser
	out *bufio.Scanner
}

func startGRPCClient(t *testing.T, target, bootstrap string) *grpcClient {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "MESHLET_TEST_GRPC_CLIENT="+target, "GRPC_XDS_BOOTSTRAP_CONFIG="+bootstrap)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { in.Close(); cmd.Wait() })
	return &grpcClient{in: in, out: bufio.NewScanner(out)}
}

func (c *grpcClient) calls(n int, user string) (map[string]int, error) {
	if user == "" {
		user = "-"
	}
	if _, err := fmt.Fprintf(c.in, "%d %s\n", n, user); err != nil {
		return nil, err
	}
	if !c.out.Scan() {
		return nil, fmt.Errorf("client exited: %v", c.out.Err())
	}
	var res struct {
		Counts map[string]int
		Error  string
	}
	if err := json.Unmarshal(c.out.Bytes(), &res); err != nil {
		return nil, fmt.Errorf("client said %q: %w", c.out.Text(), err)
	}
	if res.Error != "" {
		return nil, errors.New(res.Error)
	}
	return res.Counts, nil
}

// runGRPCClient is the child's main: dial target through xds:///, then for
// each "N USER" line make N Health/Check calls (with header end-user: USER
// unless USER is "-") and print which backends answered.
func runGRPCClient(target string) int {
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer conn.Close()
	hc := healthpb.NewHealthClient(conn)
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		var n int
		var user string
		if _, err := fmt.Sscanf(in.Text(), "%d %s", &n, &user); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		res := struct {
			Counts map[string]int
			Error  string
		}{Counts: map[string]int{}}
		for range n {
			ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
			if user != "-" {
				ctx = metadata.AppendToOutgoingContext(ctx, "end-user", user)
			}
			var md metadata.MD
			_, err := hc.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.Header(&md), grpc.WaitForReady(true))
			cancel()
			if err != nil {
				res.Error = err.Error()
				break
			}
			res.Counts[strings.Join(md.Get("backend"), ",")]++
		}
		b, _ := json.Marshal(res)
		fmt.Println(string(b))
	}
	return 0
}
