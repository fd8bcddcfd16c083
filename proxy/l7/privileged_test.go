package l7_test

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7"
	"github.com/meshlet/meshlet/proxy/server"
	"github.com/meshlet/meshlet/test/netlab"
)

// TestMain doubles as the "application" of the privileged test: with
// MLL7_GET set, the re-executed test binary (running as an app UID inside
// the pod netns, so its traffic is captured) issues HTTP requests and prints
// "status backend body" per request.
func TestMain(m *testing.M) {
	if spec, ok := os.LookupEnv(envHold); ok {
		os.Exit(holdClients(spec))
	}
	if spec, ok := os.LookupEnv("MLL7_GET"); ok {
		c := &http.Client{Timeout: 5 * time.Second}
		for _, one := range strings.Split(spec, ";") {
			parts := strings.Split(one, "|") // url|host|hdr=value...
			req, err := http.NewRequest(http.MethodGet, parts[0], nil)
			if err != nil {
				fmt.Println("error", err)
				continue
			}
			if len(parts) > 1 && parts[1] != "" {
				req.Host = parts[1]
			}
			for _, h := range parts[min(2, len(parts)):] {
				k, v, _ := strings.Cut(h, "=")
				req.Header.Set(k, v)
			}
			resp, err := c.Do(req)
			if err != nil {
				fmt.Println("error", strings.ReplaceAll(err.Error(), " ", "_"))
				continue
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			fmt.Println(resp.StatusCode, resp.Header.Get("X-Backend"), strings.TrimSpace(string(b)))
		}
		os.Exit(0)
	}
	code := m.Run()
	netlab.RemoveSelfCopy()
	os.Exit(code)
}

type logBuf struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *logBuf) Write(p []byte) (int, error) { l.mu.Lock(); defer l.mu.Unlock(); return l.b.Write(p) }
func (l *logBuf) String() string              { l.mu.Lock(); defer l.mu.Unlock(); return l.b.String() }

func serveNamed(t *testing.T, ns *netlab.NS, addr, name string) {
	t.Helper()
	ln, err := ns.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-Backend", name)
		fmt.Fprintf(w, "%s host=%s path=%s", name, r.Host, r.URL.Path)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
}

// TestPrivilegedL7ThroughCapture: real capture rules (package capture) in a
// pod netns, the generation server with the L7 engine on 15001/15006 using
// SO_ORIGINAL_DST, an app process (UID 1000) calling out, and a client netns
// calling in. The test process is the "proxy" (its UID 0 is configured as
// the proxy UID so its upstream connections are not captured again).
func TestPrivilegedL7ThroughCapture(t *testing.T) {
	netlab.Require(t)
	client := netlab.NewNS(t, "mll7-")
	pod := netlab.NewNS(t, "mll7-")
	netlab.Veth(t, client, "c0", []string{"10.213.1.1/24"}, pod, "eth0", []string{"10.213.1.2/24"})
	o := capture.NewOptions()
	o.ProxyUID, o.ProxyGID, o.IPv6 = "0", "0", "off"
	ccfg, err := capture.BuildConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := capture.Apply(t.Context(), ccfg, capture.Target{NetnsPath: pod.Path}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = capture.Cleanup(context.Background(), capture.Target{NetnsPath: pod.Path}) })

	// Upstreams in the client netns, the app in the pod.
	serveNamed(t, client, "10.213.1.1:9000", "v1")
	serveNamed(t, client, "10.213.1.1:9001", "v2")
	serveNamed(t, pod, ":8080", "app")

	cfg, err := config.ParseL7([]byte(`
ports: [{port: 9000, name: http-reviews}, {port: 8080, name: http-app}]
accessLog: {enabled: true}
services:
- name: reviews
  hosts: [reviews]
  routes:
  - name: canary
    match: [{headers: {x-canary: {exact: "yes"}}}]
    destinations: [{cluster: reviews, subset: v2}]
  - name: fault
    match: [{uri: {prefix: /fault}}]
    fault: {abort: {httpStatus: 418, percent: 100}}
    destinations: [{cluster: reviews}]
  - name: default
    destinations: [{cluster: reviews, subset: v1}]
clusters:
- name: reviews
  endpoints:
  - {address: "10.213.1.1:9000", labels: {version: v1}}
  - {address: "10.213.1.1:9001", labels: {version: v2}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
`))
	if err != nil {
		t.Fatal(err)
	}
	alog := &logBuf{}
	// The engine runs in this process; its upstream connections must be made
	// inside the pod netns (and only to this test's subnet), like a sidecar's.
	lab := netip.MustParsePrefix("10.213.0.0/16")
	podDial := func(ctx context.Context, dir l4.Direction, network, addr string) (net.Conn, error) {
		ap, err := netip.ParseAddrPort(addr)
		if err != nil || !lab.Contains(ap.Addr()) {
			t.Errorf("engine dialled %q outside the test subnet", addr)
			return nil, fmt.Errorf("refusing %q", addr)
		}
		d := net.Dialer{Timeout: 3 * time.Second}
		if dir == l4.Inbound {
			d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, 6)}
		}
		var c net.Conn
		err = pod.Do(func() error {
			var err error
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}
	engine, err := l7.New(cfg, l7.Options{AccessLog: alog, Dial: podDial})
	if err != nil {
		t.Fatal(err)
	}
	defer engine.Close()
	out, err := pod.Listen("tcp", ":15001")
	if err != nil {
		t.Fatal(err)
	}
	in, err := pod.Listen("tcp", ":15006")
	if err != nil {
		t.Fatal(err)
	}
	var choose l4.Chooser
	srv, err := server.New(server.Options{
		Config: config.Default(),
		Listeners: server.Listeners{
			Outbound: []*net.TCPListener{out.(*net.TCPListener)},
			Inbound:  []*net.TCPListener{in.(*net.TCPListener)},
		},
		Chooser: func(c *l4.Conn) l4.Handler { return choose(c) },
	})
	if err != nil {
		t.Fatal(err)
	}
	choose = engine.Chooser(srv.Forwarder())
	srv.Start()
	defer srv.Close()

	// Outbound: the app (UID/GID 1000) calls the upstreams; capture sends it to 15001.
	cmd := exec.Command(netlab.SelfCopy(t))
	cmd.Env = []string{"MLL7_GET=" + strings.Join([]string{
		"http://10.213.1.1:9000/a|reviews",
		"http://10.213.1.1:9000/a|reviews|X-Canary=yes",
		"http://10.213.1.1:9000/fault|reviews",
		"http://10.213.1.1:9001/p|unknown.example",
	}, ";")}
	got, err := pod.Run(cmd, 1000, 1000)
	if err != nil {
		t.Fatalf("app process: %v\n%s", err, got)
	}
	want := []string{
		"200 v1 v1 host=reviews path=/a",
		"200 v2 v2 host=reviews path=/a",
		"418  fault filter abort",
		"200 v2 v2 host=unknown.example path=/p", // no service: original destination
	}
	lines := strings.Split(strings.TrimSpace(string(got)), "\n")
	if strings.Join(lines, "\n") != strings.Join(want, "\n") {
		t.Fatalf("outbound through capture:\n got: %q\nwant: %q", lines, want)
	}

	// Inbound: a client in the other netns calls the app; capture sends it to
	// 15006, the engine forwards to the app from 127.0.0.6.
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) { return client.Dial(network, addr) },
	}}
	resp, err := hc.Get("http://10.213.1.2:8080/in")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(b) != "app host=10.213.1.2:8080 path=/in" {
		t.Fatalf("inbound: %d %q", resp.StatusCode, b)
	}
	log := alog.String()
	for _, w := range []string{`"direction":"inbound"`, `"route":"reviews/canary"`, `"flags":"FI"`, `"cluster":"passthrough"`} {
		if !strings.Contains(log, w) {
			t.Errorf("access log lacks %s (traffic did not go through the L7 engine):\n%s", w, log)
		}
	}
}
