package agent_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/test/netlab"
)

// podLab is a client netns joined by veth to a "pod" netns with meshlet's
// real capture rules, an app server on :8080 in the pod, an upstream
// server on :9000 in the client, and `meshlet agent` running in the pod as
// UID/GID 1337 on its default ports.
type podLab struct {
	client, pod         *netlab.NS
	podIP, podIP6       string
	clientIP, clientIP6 string
	agent               *exec.Cmd
	agentOut            *proctest.SyncBuf
	agentExited         chan error
	configPath          string
	backends            []string // serveBackend keys of the app and the upstream
}

func newPodLab(t *testing.T, subnet int, agentArgs ...string) *podLab {
	t.Helper()
	netlab.Require(t)
	l := &podLab{
		client: netlab.NewNS(t, "mlpx-"), pod: netlab.NewNS(t, "mlpx-"),
		clientIP: fmt.Sprintf("10.212.%d.1", subnet), podIP: fmt.Sprintf("10.212.%d.2", subnet),
		clientIP6: fmt.Sprintf("fd00:212:%d::1", subnet), podIP6: fmt.Sprintf("fd00:212:%d::2", subnet),
	}
	netlab.Veth(t, l.client, "c0", []string{l.clientIP + "/24", l.clientIP6 + "/64"}, l.pod, "eth0", []string{l.podIP + "/24", l.podIP6 + "/64"})
	o := capture.NewOptions()
	o.IPv6 = "on"
	cfg, err := capture.BuildConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := capture.Apply(t.Context(), cfg, capture.Target{NetnsPath: l.pod.Path}); err != nil {
		t.Fatal(err)
	}
	// The app in the pod and the upstream in the client network.
	for _, s := range []struct {
		ns   *netlab.NS
		addr string
	}{{l.pod, ":8080"}, {l.client, ":9000"}} {
		ln, err := s.ns.Listen("tcp", s.addr)
		if err != nil {
			t.Fatal(err)
		}
		l.backends = append(l.backends, serveBackend(t, ln))
	}
	dir, err := os.MkdirTemp("", "mlpx-agent-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	_ = os.Chmod(dir, 0o755)
	l.configPath = filepath.Join(dir, "proxy.yaml")
	if err := os.WriteFile(l.configPath, fmt.Appendf(nil, goodConfig, 10), 0o644); err != nil {
		t.Fatal(err)
	}
	bin := netlab.SelfCopy(t)
	l.agentOut = &proctest.SyncBuf{}
	l.agent = exec.Command(bin, append([]string{"agent", "--config", l.configPath, "--drain-duration", "5s"}, agentArgs...)...)
	l.agent.Env = append(os.Environ(), envExec+"=1")
	l.agent.Stdout, l.agent.Stderr = l.agentOut, l.agentOut
	if err := l.pod.Start(l.agent, 1337, 1337); err != nil {
		t.Fatal(err)
	}
	l.agentExited = make(chan error, 1)
	go func() { l.agentExited <- l.agent.Wait() }()
	t.Cleanup(func() {
		_ = l.agent.Process.Kill()
		<-l.agentExited
		if t.Failed() {
			t.Logf("agent output:\n%s", l.agentOut.String())
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if code, _ := l.get(t, "http://"+l.podIP+":15021/healthz/ready"); code == 200 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("sidecar not ready:\n%s", l.agentOut.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	// The generation serves 15021 a moment before the agent has taken its
	// readiness report: wait for the agent too.
	for !l.info(t).Ready {
		if time.Now().After(deadline) {
			t.Fatalf("agent not ready:\n%s", l.agentOut.String())
		}
		time.Sleep(10 * time.Millisecond)
	}
	return l
}

func (l *podLab) clientDial(_ context.Context, network, addr string) (net.Conn, error) {
	return l.client.Dial(network, addr)
}

func (l *podLab) podDial(_ context.Context, network, addr string) (net.Conn, error) {
	return l.pod.Dial(network, addr)
}

// get fetches url from the client namespace.
func (l *podLab) get(t *testing.T, url string) (int, string) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DialContext: l.clientDial, DisableKeepAlives: true}}
	resp, err := c.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	var b strings.Builder
	_, _ = fmt.Fprint(&b, resp.Status)
	buf := make([]byte, 64<<10)
	n, _ := resp.Body.Read(buf)
	return resp.StatusCode, string(buf[:n])
}

// reload asks the agent for a hot restart from inside the pod (loopback:
// the status server refuses it from anywhere else).
func (l *podLab) reload(t *testing.T) string {
	t.Helper()
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DialContext: l.podDial}}
	resp, err := c.Post("http://127.0.0.1:15020/reload", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	buf := make([]byte, 4096)
	n, _ := resp.Body.Read(buf)
	return string(buf[:n])
}

// TestPrivilegedCaptureSoak: real capture rules, the agent as UID 1337,
// real SO_ORIGINAL_DST (IPv4 and IPv6). Inbound load from the client to the
// pod's app (keep-alive, new connections, long streams; IPv4 and IPv6) and
// outbound load from the pod to the client's upstream run while the config
// changes; a bad config in the middle; zero failures. Then kill -9 of the
// generation: new connections wait in the backlog and are served.
func TestPrivilegedCaptureSoak(t *testing.T) {
	l := newPodLab(t, 1)

	// Inbound passthrough arrives from 127.0.0.6 / ::6 (the app sees it).
	loads := []*load{
		startLoadVia(l.clientDial, l.podIP+":8080", 3, 2, 3),
		startLoadVia(l.clientDial, "["+l.podIP6+"]:8080", 1, 1, 1),
		startLoadVia(l.podDial, l.clientIP+":9000", 2, 1, 3),
		startLoadVia(l.podDial, "["+l.clientIP6+"]:9000", 1, 0, 1),
	}
	time.Sleep(300 * time.Millisecond)
	for i := 0; i < 6; i++ {
		if i == 3 {
			if err := os.WriteFile(l.configPath, []byte("apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\noutbound:\n  maxConnections: lots\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			if r := l.reload(t); !strings.Contains(r, "error") {
				t.Errorf("bad config accepted: %s", r)
			}
		}
		if err := os.WriteFile(l.configPath, fmt.Appendf(nil, goodConfig, 20+i), 0o644); err != nil {
			t.Fatal(err)
		}
		if r := l.reload(t); strings.Contains(r, "error") {
			t.Fatalf("reload %d: %s", i, r)
		}
		time.Sleep(300 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	var opened, inbound, outbound int64
	for i, ld := range loads {
		ld.finish(t)
		opened += ld.opened.Load()
		if i < 2 { // client → pod app: captured inbound
			inbound += ld.opened.Load()
		} else {
			outbound += ld.opened.Load()
		}
	}
	if got := acceptedBy(l.backends[0]) + acceptedBy(l.backends[1]); got != opened {
		t.Errorf("backends accepted %d connections, clients opened %d", got, opened)
	}
	// The connection counters live in the agent's shared region and carry
	// across the generations: each equals the connections the clients of
	// its direction opened (probes and scrapes go to the sidecar's own
	// ports, which are not captured).
	_, body := l.get(t, "http://"+l.podIP+":15090/stats/prometheus")
	for name, want := range map[string]int64{
		`meshlet_proxy_connections_total{direction="inbound"}`:  inbound,
		`meshlet_proxy_connections_total{direction="outbound"}`: outbound,
	} {
		if got := metricIn(t, body, name); got != float64(want) {
			t.Errorf("%s = %v across the generations; the clients opened %d", name, got, want)
		}
	}
	for _, zero := range []string{
		`meshlet_proxy_drain_closed_connections_total{direction="inbound"} 0`,
		`meshlet_proxy_drain_closed_connections_total{direction="outbound"} 0`,
		`meshlet_proxy_errors_total{direction="inbound",kind="handover"} 0`,
		`meshlet_proxy_errors_total{direction="outbound",kind="handover"} 0`,
	} {
		if !strings.Contains(body, zero+"\n") {
			t.Errorf("want %s in the metrics", zero)
		}
	}
	for _, moved := range []string{`meshlet_proxy_handed_over_connections_total{direction="inbound"}`, `meshlet_proxy_handed_over_connections_total{direction="outbound"}`} {
		if !strings.Contains(body, moved) || strings.Contains(body, moved+" 0\n") {
			t.Errorf("no connection handed over: %s", moved)
		}
	}
	if strings.Contains(body, `kind="original_destination"} 0`) == false {
		t.Errorf("original destination errors under real capture:\n%s", body)
	}

	// kill -9 of the serving generation.
	_, info := l.status(t, l.podDial, http.MethodGet, "127.0.0.1", "/server_info")
	var pid int
	for _, line := range strings.Split(info, "\n") {
		if strings.Contains(line, `"pid"`) {
			fmt.Sscanf(strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(line), `"pid":`)), "%d", &pid)
		}
	}
	if pid == 0 {
		t.Fatalf("no generation pid in %s", info)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 40)
	for i := 0; i < 40; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := l.clientDial(context.Background(), "tcp", l.podIP+":8080")
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			body := []byte("after kill -9")
			if err := proctest.Post(c, bufio.NewReader(c), body, true); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("after kill -9: %v", err)
	}
}
