package generation_test

import (
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
	"github.com/meshlet/meshlet/proxy/identity"
	"github.com/meshlet/meshlet/proxy/mtls/mtlstest"
	"github.com/meshlet/meshlet/proxy/xds/xdstest"
)

// mtlsMeshYAML is the server pod reviews-0 (meshed, service account
// reviews) behind Service reviews:9080 whose target port is the server
// generation's inbound listener, and a PeerAuthentication STRICT for shop.
func mtlsMeshYAML(inboundPort uint16) string {
	return fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata: {name: reviews-0, namespace: shop, labels: {app: reviews, security.istio.io/tlsMode: istio}}
spec: {serviceAccountName: reviews, containers: [{name: app, image: reviews}]}
status: {podIP: 127.0.0.1, podIPs: [{ip: 127.0.0.1}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop}
spec: {clusterIP: 10.96.0.9, clusterIPs: [10.96.0.9], ports: [{name: http, port: 9080, targetPort: %[1]d}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: reviews-1, namespace: shop, labels: {kubernetes.io/service-name: reviews}}
addressType: IPv4
ports: [{name: http, port: %[1]d}]
endpoints: [{addresses: [127.0.0.1], targetRef: {kind: Pod, name: reviews-0, namespace: shop}}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
`, inboundPort)
}

// startMTLSGeneration runs a generation in xDS mode with options o (of
// node nodeID) and identity id, serving the translation of yaml; it
// returns once ready.
func startMTLSGeneration(t *testing.T, o generation.Options, nodeID string, id *identity.Store, yaml string) generation.Options {
	t.Helper()
	o.Identity = id
	srv := xdstest.StartServer(t, o.XDS.Address, nodeID)
	srv.Set(t, "1", translated(t, yaml))
	runGeneration(t, o)
	deadline := time.Now().Add(10 * time.Second)
	for code, body := proctest.HTTPGet("http://" + o.HealthAddr + "/healthz/ready"); code != http.StatusOK; code, body = proctest.HTTPGet("http://" + o.HealthAddr + "/healthz/ready") {
		if time.Now().After(deadline) {
			t.Fatalf("not ready: %d %q", code, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return o
}

// TestGenerationXDSMTLS: two proxy generations in xDS mode, configured by
// the discovery server's real translation, with certificates of the mesh
// CA. The client generation reaches the meshed pod over Istio's automatic
// mutual TLS; the server generation, under a namespace-wide STRICT
// PeerAuthentication, serves it, gives the application XFCC naming the
// caller, and closes a plain-text connection.
func TestGenerationXDSMTLS(t *testing.T) {
	ca := mtlstest.NewCA(t)
	srvID, cliID := &identity.Store{}, &identity.Store{}
	srvID.Set(ca.Issue(t, "shop", "reviews"), ca.Roots())
	cliID.Set(ca.Issue(t, "shop", "sleep"), ca.Roots())
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, "xfcc="+r.Header.Get("X-Forwarded-Client-Cert"))
	})}
	go func() { _ = hs.Serve(ln) }()
	t.Cleanup(func() { _ = hs.Close() })
	app := netip.MustParseAddrPort(ln.Addr().String())

	// The server's inbound port is known before the translation names it.
	// Both generations are node reviews-0 to the translation (the same
	// environment, set once); the client one has no inbound listener and
	// its original destination is the Service's VIP.
	so, node := xdsGenerationOptions(t, "reviews-0", "reviews", true, app)
	yaml := mtlsMeshYAML(netip.MustParseAddrPort(so.InboundAddr).Port())
	co, _ := xdsGenerationOptions(t, "reviews-0", "reviews", false, netip.MustParseAddrPort("10.96.0.9:9080"))
	srvOpts := startMTLSGeneration(t, so, node, srvID, yaml)
	cli := startMTLSGeneration(t, co, node, cliID, yaml)

	req, _ := http.NewRequest(http.MethodGet, "http://"+cli.OutboundAddr+"/", nil)
	req.Host = "reviews.shop.svc.cluster.local:9080"
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.HasPrefix(string(b), "xfcc=By=spiffe://cluster.local/ns/shop/sa/reviews;Hash=") ||
		!strings.HasSuffix(string(b), ";URI=spiffe://cluster.local/ns/shop/sa/sleep") {
		t.Fatalf("client → server generation: %d %q", resp.StatusCode, b)
	}
	// Plain text straight to the STRICT server: closed unanswered.
	if code, body := proctest.HTTPGet("http://" + srvOpts.InboundAddr + "/"); code != 0 {
		t.Fatalf("plain text on STRICT: %d %q", code, body)
	}
}
