package agent_test

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/agent"
)

type proc struct {
	cmd                                        *exec.Cmd
	out                                        *proctest.SyncBuf
	outbound, inbound, health, prom, admin, st string
	configPath                                 string
	exited                                     chan error
}

const goodConfig = "apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\noutbound:\n  connectTimeout: %ds\n"

// startAgent runs `meshlet agent` (this test binary) on loopback ports,
// forwarding every connection to dest (there is no iptables here).
func startAgent(t *testing.T, dest string, extra ...string) *proc {
	t.Helper()
	return startAgentExe(t, dest, os.Args[0], extra...)
}

// startAgentExe is startAgent with the binary the agent re-executes for its
// generations.
func startAgentExe(t *testing.T, dest, exe string, extra ...string) *proc {
	t.Helper()
	p := launchAgent(t, dest, exe, extra...)
	p.waitReady(t)
	return p
}

// launchAgent is startAgentExe without waiting for readiness.
func launchAgent(t *testing.T, dest, exe string, extra ...string) *proc {
	t.Helper()
	return launchAgentEnv(t, dest, exe, nil, extra...)
}

// launchAgentEnv is launchAgent with env added to the agent's (and so its
// generations') environment.
func launchAgentEnv(t *testing.T, dest, exe string, env []string, extra ...string) *proc {
	t.Helper()
	return launchAgentBin(t, os.Args[0], dest, exe, env, extra...)
}

// launchAgentBin is launchAgentEnv with the agent's own binary: this test
// binary (os.Args[0], which acts as meshlet) or a real meshlet build.
func launchAgentBin(t testing.TB, agentExe, dest, exe string, env []string, extra ...string) *proc {
	t.Helper()
	p := &proc{out: &proctest.SyncBuf{}, exited: make(chan error, 1)}
	p.outbound, p.inbound, p.health, p.prom, p.admin, p.st = proctest.FreePort(t), proctest.FreePort(t), proctest.FreePort(t), proctest.FreePort(t), proctest.FreePort(t), proctest.FreePort(t)
	p.configPath = filepath.Join(t.TempDir(), "proxy.yaml")
	if err := os.WriteFile(p.configPath, fmt.Appendf(nil, goodConfig, 10), 0o644); err != nil {
		t.Fatal(err)
	}
	args := append([]string{"agent", "--config", p.configPath,
		"--outbound-addr", p.outbound, "--inbound-addr", p.inbound, "--health-addr", p.health,
		"--prometheus-addr", p.prom, "--admin-addr", p.admin, "--status-addr", p.st,
		"--proxy-arg=--static-destination=" + dest}, extra...)
	args = append(args, "--proxy-executable", exe)
	p.cmd = exec.Command(agentExe, args...)
	p.cmd.Env = append(append(os.Environ(), env...), envExec+"=1")
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	// Its own process group, as PID 1 of a container has: tests may signal
	// the whole group (a terminal's Ctrl-C).
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.exited <- p.cmd.Wait() }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Signal(syscall.SIGKILL)
		<-p.exited
		if t.Failed() {
			t.Logf("agent output:\n%s", p.out.String())
		}
	})
	return p
}

func (p *proc) waitReady(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		if code, _ := proctest.HTTPGet("http://" + p.st + "/healthz/ready"); code == 200 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("agent not ready; output:\n%s", p.out.String())
}

func (p *proc) reload(t testing.TB) agent.ReloadResult {
	t.Helper()
	resp, err := http.Post("http://"+p.st+"/reload", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r agent.ReloadResult
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatal(err)
	}
	return r
}

func (p *proc) info(t testing.TB) agent.Info {
	t.Helper()
	_, body := proctest.HTTPGet("http://" + p.st + "/server_info")
	var i agent.Info
	if err := json.Unmarshal([]byte(body), &i); err != nil {
		t.Fatalf("server_info %q: %v", body, err)
	}
	return i
}

func (p *proc) metric(t testing.TB, name string) float64 {
	t.Helper()
	_, body := proctest.HTTPGet("http://" + p.st + "/stats/prometheus")
	return metricIn(t, body, name)
}

// metricIn is the value of the series name (with its labels) in a
// Prometheus exposition; the test fails when it is absent or not a number.
func metricIn(t testing.TB, body, name string) float64 {
	t.Helper()
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("metric %s not found in:\n%s", name, body)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatalf("metric %s: %v", name, err)
	}
	return v
}

// httpBackend serves, on one loopback port (the static destination),
// HTTP/1.1 (1 KiB responses) and raw TCP echo streams, which start with 'S'.
func httpBackend(t testing.TB) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return serveBackend(t, ln)
}

// accepted counts the connections each backend (by address) accepted.
var accepted sync.Map // string → *atomic.Int64

func acceptedBy(addr string) int64 {
	v, ok := accepted.Load(addr)
	if !ok {
		return 0
	}
	return v.(*atomic.Int64).Load()
}

// serveBackend serves httpBackend's protocol on ln: a GET is answered by
// net/http (1 KiB); a POST by a server that writes the head, pauses 1-50ms
// and writes the body (an echo of the request body) apart; a connection
// starting with 'S' is an echo stream, 'E' a stream of numbered events every
// 10ms, 'D' a database-like exchange (query, answer in two writes, idle
// until the next query: the server speaks last). Every accepted connection
// is counted (acceptedBy).
func serveBackend(t testing.TB, ln net.Listener) string {
	t.Helper()
	n := &atomic.Int64{}
	accepted.Store(ln.Addr().String(), n)
	proctest.ServeBackend(t, ln, 1, func(first []byte, c *net.TCPConn, br *bufio.Reader) bool {
		n.Add(1)
		switch first[0] {
		case 'S':
			defer c.Close()
			_, _ = io.Copy(c, br)
			_ = c.CloseWrite()
		case 'P':
			defer c.Close()
			proctest.SplitHTTP(c, br)
		case 'E':
			defer c.Close()
			for i := 0; ; i++ {
				if _, err := fmt.Fprintf(c, "data: %d\n\n", i); err != nil {
					return true
				}
				time.Sleep(10 * time.Millisecond)
			}
		case 'D':
			defer c.Close()
			serveDatabase(c, br)
		default:
			return false
		}
		return true
	})
	return ln.Addr().String()
}

// serveDatabase answers a database-like exchange: each query line gets a
// head line and the query echoed, in two writes with pauses; between
// queries the connection is idle and the server spoke last.
func serveDatabase(c *net.TCPConn, br *bufio.Reader) {
	for i := 0; ; i++ {
		q, err := br.ReadString('\n')
		if err != nil {
			return
		}
		time.Sleep(time.Duration(1+i%5) * time.Millisecond)
		fmt.Fprintf(c, "ROWS %d\n", len(q))
		time.Sleep(time.Duration(1+i%7) * time.Millisecond)
		fmt.Fprintf(c, "%s", q)
	}
}

// waitCleanExit waits up to within for the agent to exit with status 0;
// what says after what, for the failure message.
func (p *proc) waitCleanExit(t *testing.T, within time.Duration, what string) {
	t.Helper()
	select {
	case err := <-p.exited:
		p.exited <- err
		if err != nil {
			t.Errorf("agent exit %s: %v", what, err)
		}
	case <-time.After(within):
		t.Fatalf("agent did not exit %s", what)
	}
}

// metricOr is metric without failing: def when the series is absent.
func (p *proc) metricOr(name string, def float64) float64 {
	_, body := proctest.HTTPGet("http://" + p.st + "/stats/prometheus")
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindStringSubmatch(body)
	if m == nil {
		return def
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}
