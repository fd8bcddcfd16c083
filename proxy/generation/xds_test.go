package generation_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/generation"
	"github.com/meshlet/meshlet/proxy/xds"
	"github.com/meshlet/meshlet/proxy/xds/xdstest"
)

func backend(t *testing.T, name string) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		fmt.Fprint(w, name)
	})}
	go func() { _ = hs.Serve(ln) }()
	t.Cleanup(func() { _ = hs.Close() })
	return ln.Addr().String()
}

// TestGenerationXDS runs a proxy generation in xDS mode whose discovery
// server is not up yet: it serves, answers /healthz/ready 503 saying why;
// once the server comes up with a 90/10 canary it becomes ready, routes
// real traffic accordingly, and /config_dump and /server_info show the
// xDS resources and the client's state.
func TestGenerationXDS(t *testing.T) {
	// A loopback "VIP": nothing listens there, so a request the routes
	// miss fails instead of leaving the machine.
	o, nodeID := xdsGenerationOptions(t, "client-0", "client", false, netip.MustParseAddrPort("127.0.0.77:9080"))
	runGeneration(t, o)

	var code int
	var body string
	deadline := time.Now().Add(10 * time.Second)
	for code, body = proctest.HTTPGet("http://" + o.HealthAddr + "/healthz/ready"); code != http.StatusServiceUnavailable; code, body = proctest.HTTPGet("http://" + o.HealthAddr + "/healthz/ready") {
		if time.Now().After(deadline) {
			t.Fatalf("health before the control plane: %d %q", code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if !strings.Contains(body, "no complete configuration") {
		t.Errorf("not-ready reason %q", body)
	}

	srv := xdstest.StartServer(t, o.XDS.Address, nodeID)
	m := xdstest.Mesh{Host: "reviews.shop.svc.cluster.local", Port: 9080, VIP: "127.0.0.77",
		Subsets: map[string][]string{"v1": {backend(t, "v1")}, "v2": {backend(t, "v2")}},
		Weights: map[string]uint32{"v1": 90, "v2": 10}}
	srv.Set(t, "1", m.Resources())
	for code, body = proctest.HTTPGet("http://" + o.HealthAddr + "/healthz/ready"); code != http.StatusOK; code, body = proctest.HTTPGet("http://" + o.HealthAddr + "/healthz/ready") {
		if time.Now().After(deadline) {
			t.Fatalf("not ready after the control plane came up: %d %q", code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}

	got := map[string]int{}
	c := &http.Client{Timeout: 3 * time.Second}
	for range 500 {
		req, _ := http.NewRequest(http.MethodPost, "http://"+o.OutboundAddr+"/", strings.NewReader("x"))
		req.Host = "reviews.shop.svc.cluster.local:9080"
		resp, err := c.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		got[string(b)]++
	}
	if got["v1"]+got["v2"] != 500 || got["v2"] < 25 || got["v2"] > 80 {
		t.Errorf("split %v; want v2 ≈ 50 of 500", got)
	}

	_, dump := proctest.HTTPGet("http://" + o.AdminAddr + "/config_dump?include_eds")
	var cd struct {
		Configs []map[string]any `json:"configs"`
	}
	if err := json.Unmarshal([]byte(dump), &cd); err != nil {
		t.Fatalf("config_dump: %v", err)
	}
	var types []string
	for _, c := range cd.Configs {
		types = append(types, fmt.Sprint(c["@type"]))
	}
	if want := "type.googleapis.com/envoy.admin.v3.ClustersConfigDump type.googleapis.com/envoy.admin.v3.ListenersConfigDump type.googleapis.com/envoy.admin.v3.RoutesConfigDump type.googleapis.com/envoy.admin.v3.EndpointsConfigDump"; strings.Join(types, " ") != want {
		t.Errorf("config_dump types %v", types)
	}
	if !strings.Contains(dump, `"name":"outbound|9080|v2|reviews.shop.svc.cluster.local"`) && !strings.Contains(dump, `"name": "outbound|9080|v2|reviews.shop.svc.cluster.local"`) {
		t.Errorf("config_dump lacks the v2 cluster")
	}
	_, info := proctest.HTTPGet("http://" + o.AdminAddr + "/server_info")
	var si struct {
		Dynamic xds.Status `json:"dynamic"`
	}
	if err := json.Unmarshal([]byte(info), &si); err != nil {
		t.Fatal(err)
	}
	if s := si.Dynamic; !s.Connected || s.Source != xds.SourceControlPlane || !s.Ready || s.Versions["rds"] != "1" {
		t.Errorf("server_info dynamic %+v", s)
	}
	_, prom := proctest.HTTPGet("http://" + o.PrometheusAddr + "/stats/prometheus")
	for _, want := range []string{"meshlet_xds_connected 1", `meshlet_xds_updates_total{result="applied",type="cds"}`, "meshlet_xds_push_to_applied_seconds_count"} {
		if !strings.Contains(prom, want) {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// xdsGenerationOptions are the options of a generation in xDS mode for pod
// (namespace shop, service account sa, IP 127.0.0.1; set in the environment
// as the downward API would) on free loopback ports, with an inbound
// listener when inbound, and every connection's original destination dst
// (no capture rules here). It returns the node id the generation will send.
func xdsGenerationOptions(t *testing.T, pod, sa string, inbound bool, dst netip.AddrPort) (generation.Options, string) {
	t.Helper()
	env := map[string]string{"POD_NAME": pod, "POD_NAMESPACE": "shop", "INSTANCE_IP": "127.0.0.1", "SERVICE_ACCOUNT": sa}
	for k, v := range env {
		t.Setenv(k, v)
	}
	id, _ := xds.IdentityFromEnv(func(k string) string { return env[k] }, nil)
	o := generation.NewOptions()
	o.OutboundAddr = proctest.FreePort(t)
	if inbound {
		o.InboundAddr = proctest.FreePort(t)
	} else {
		o.InboundAddr = ""
	}
	o.HealthAddr, o.PrometheusAddr, o.AdminAddr = proctest.FreePort(t), proctest.FreePort(t), proctest.FreePort(t)
	o.StaticDestination = dst
	o.DrainDuration = time.Second
	o.Log = &proctest.SyncBuf{}
	o.XDS = xds.Settings{Address: proctest.FreePort(t), StateFile: t.TempDir() + "/xds-state", InitialWait: 200 * time.Millisecond}
	return o, id.NodeID()
}

// runGeneration runs a generation with o until the test ends, failing the
// test if it returns an error.
func runGeneration(t *testing.T, o generation.Options) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- generation.Run(ctx, o) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("generation: %v", err)
		}
	})
}
