package agent_test

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/agent"
)

// l7Config routes Host "web" on the backend's port (declared HTTP) to a
// cluster of that backend; timeout only makes two configs differ.
func l7Config(backend string, timeout int) []byte {
	_, port, _ := net.SplitHostPort(backend)
	return fmt.Appendf(nil, `apiVersion: meshlet.io/v1alpha1
kind: ProxyConfig
outbound:
  connectTimeout: %ds
l7:
  ports: [{port: %s, name: http-web}]
  services:
  - name: web
    hosts: [web]
    routes: [{name: r, destinations: [{cluster: web}]}]
  clusters:
  - {name: web, endpoints: [{address: %q}]}
`, timeout, port, backend)
}

// sendL7 sends n GETs for Host web through the outbound listener, each on
// its own connection, and checks each is answered 200 by the backend.
func sendL7(t *testing.T, p *proc, n int) {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	for i := 0; i < n; i++ {
		req, err := http.NewRequest(http.MethodGet, "http://"+p.outbound+"/", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = "web"
		resp, err := c.Do(req)
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("request %d: status %d", i, resp.StatusCode)
		}
	}
}

var l7OK = regexp.MustCompile(`(?m)^meshlet_l7_requests_total\{cluster="web",code_class="2xx",direction="outbound",route="[^"]*"\} (\S+)$`)

// l7Requests reads the 2xx request counter of route web from addr's
// /stats/prometheus (0 when absent).
func l7Requests(t *testing.T, addr string) float64 {
	t.Helper()
	code, body := proctest.HTTPGet("http://" + addr + "/stats/prometheus")
	if code != http.StatusOK {
		t.Fatalf("%s/stats/prometheus: %d %s", addr, code, body)
	}
	m := l7OK.FindStringSubmatch(body)
	if m == nil {
		return 0
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatalf("%s: %v", m[0], err)
	}
	return v
}

// wantL7Requests waits until both the agent's status port (15020) and the
// generation's Prometheus port (15090) report want requests (a request is
// counted once its response is written, which may be just after the client
// read it), then checks neither reports more.
func wantL7Requests(t *testing.T, p *proc, want float64, what string) {
	t.Helper()
	for _, addr := range []string{p.st, p.prom} {
		deadline := time.Now().Add(10 * time.Second)
		for l7Requests(t, addr) < want && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		if got := l7Requests(t, addr); got != want {
			t.Errorf("%s: %s reports meshlet_l7_requests_total %v, want %v", what, addr, got, want)
		}
	}
}

// TestL7CountersSurviveRestarts: the L7 request counter read on the agent's
// status port and on the Prometheus port is the number of requests served
// by every generation so far — across a hot restart (config change, the old
// generation drains and exits) and a crash (SIGKILL, the agent starts the
// next one). Nothing counted is lost in a crash: the counters are in the
// region the agent owns.
func TestL7CountersSurviveRestarts(t *testing.T) {
	backend := httpBackend(t)
	p := startAgent(t, backend)
	writeFile(t, p.configPath, l7Config(backend, 10))
	if r := p.reload(t); r.Error != "" {
		t.Fatalf("reload to the L7 config: %s", r.Error)
	}
	p.waitActiveHash(t, "L7 config", configHash(t, l7Config(backend, 10)))
	const n, m, k = 7, 5, 3
	sendL7(t, p, n)
	wantL7Requests(t, p, n, "first generation")

	cfg2 := l7Config(backend, 9)
	writeFile(t, p.configPath, cfg2)
	if r := p.reload(t); r.Error != "" {
		t.Fatalf("hot restart: %s", r.Error)
	}
	p.waitActiveHash(t, "hot restart", configHash(t, cfg2))
	wantL7Requests(t, p, n, "after the hot restart, before new requests")
	sendL7(t, p, m)
	wantL7Requests(t, p, n+m, "after the hot restart")

	pid := activePID(t, p)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	p.waitInfo(t, "a generation after the crash", func(i agent.Info) bool {
		return len(i.Generations) == 1 && i.Generations[0].State == "ACTIVE" && i.Generations[0].PID != pid
	})
	wantL7Requests(t, p, n+m, "after the crash, before new requests")
	sendL7(t, p, k)
	wantL7Requests(t, p, n+m+k, "after the crash")
}
