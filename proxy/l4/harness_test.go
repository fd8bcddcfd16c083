package l4_test

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/cmd/meshlet/app"
	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/test/netlab"
)

// envExec makes the test binary behave as the meshlet binary, so the tests
// below run `meshlet proxy` as a real process with real sockets.
const envExec = proctest.EnvExec

func TestMain(m *testing.M) {
	if os.Getenv(envExec) == "1" {
		os.Exit(app.Main())
	}
	code := m.Run()
	netlab.RemoveSelfCopy()
	os.Exit(code)
}

type proxyProc struct {
	cmd                            *exec.Cmd
	out                            *proctest.SyncBuf
	outbound, inbound, prom, admin string
	exited                         chan struct{}
	waitErr                        error
	baseRSS                        int // kB, once serving
}

// startProxy runs `meshlet proxy` (this test binary). dest, if not empty, is
// the --static-destination every connection is forwarded to (no iptables on
// plain loopback); config, if not empty, is the YAML configuration.
func startProxy(t *testing.T, dest, config string) *proxyProc {
	t.Helper()
	p := &proxyProc{out: &proctest.SyncBuf{}, exited: make(chan struct{})}
	p.outbound, p.inbound, p.prom, p.admin = proctest.FreePort(t), proctest.FreePort(t), proctest.FreePort(t), proctest.FreePort(t)
	args := []string{"proxy", "--outbound-addr", p.outbound, "--inbound-addr", p.inbound,
		"--health-addr", "", "--prometheus-addr", p.prom, "--admin-addr", p.admin, "--drain-duration", "2s", "-v"}
	if dest != "" {
		args = append(args, "--static-destination", dest)
	}
	if config != "" {
		path := filepath.Join(t.TempDir(), "proxy.yaml")
		if err := os.WriteFile(path, []byte(config), 0o644); err != nil {
			t.Fatal(err)
		}
		args = append(args, "--config", path)
	}
	p.cmd = exec.Command(os.Args[0], args...)
	p.cmd.Env = append(os.Environ(), envExec+"=1")
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.waitErr = p.cmd.Wait(); close(p.exited) }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.exited
		if t.Failed() {
			t.Logf("proxy output (last 8 KiB):\n%s", tail(p.out.String(), 8<<10))
		}
	})
	deadline := time.Now().Add(20 * time.Second)
	for {
		if code, _ := proctest.HTTPGet("http://" + p.admin + "/ready"); code == http.StatusOK {
			break
		}
		p.mustRun(t)
		if time.Now().After(deadline) {
			t.Fatal("proxy not ready")
		}
		time.Sleep(20 * time.Millisecond)
	}
	p.baseRSS = p.rssKB(t)
	return p
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// mustRun fails the test if the proxy exited.
func (p *proxyProc) mustRun(t *testing.T) {
	t.Helper()
	select {
	case <-p.exited:
		t.Fatalf("proxy exited: %v", p.waitErr)
	default:
	}
}

// rssKB is the proxy's resident set size (VmRSS) in kB.
func (p *proxyProc) rssKB(t *testing.T) int {
	t.Helper()
	return procStatus(t, p.cmd.Process.Pid, "VmRSS")
}

func procStatus(t *testing.T, pid int, field string) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^` + field + `:\s+(\d+)`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("%s not in /proc/%d/status", field, pid)
	}
	n, _ := strconv.Atoi(string(m[1]))
	return n
}

// cpuTicks is the proxy's user+system CPU time in clock ticks (1/100 s).
func cpuTicks(t *testing.T, pid int) int {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		t.Fatal(err)
	}
	// Fields after the parenthesised command name; utime and stime are
	// fields 14 and 15 of the whole line.
	f := strings.Fields(string(b[bytes.LastIndexByte(b, ')')+2:]))
	u, _ := strconv.Atoi(f[11])
	s, _ := strconv.Atoi(f[12])
	return u + s
}

// assertBounded checks the proxy still runs, serves a normal request and
// that its RSS grew by at most maxGrowthMB over its RSS when it started.
func (p *proxyProc) assertBounded(t *testing.T, maxGrowthMB int) {
	t.Helper()
	p.mustRun(t)
	if err := normalRequest(p.outbound); err != nil {
		t.Errorf("normal request through %s: %v", p.outbound, err)
	}
	rss := p.rssKB(t)
	t.Logf("proxy RSS %d kB (at start %d kB)", rss, p.baseRSS)
	if rss-p.baseRSS > maxGrowthMB<<10 {
		t.Errorf("proxy RSS grew from %d kB to %d kB (bound +%d MiB)", p.baseRSS, rss, maxGrowthMB)
	}
}

// metric reads one sample from the proxy's Prometheus listener.
func (p *proxyProc) metric(t *testing.T, name string) float64 {
	t.Helper()
	_, body := proctest.HTTPGet("http://" + p.prom + "/stats/prometheus")
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("metric %s not found in:\n%s", name, body)
	}
	v, _ := strconv.ParseFloat(m[1], 64)
	return v
}

// waitMetric waits until cond holds for the metric (or fails after 20 s).
func (p *proxyProc) waitMetric(t *testing.T, name string, cond func(float64) bool) float64 {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		v := p.metric(t, name)
		if cond(v) {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("metric %s stuck at %v", name, v)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// normalRequest is one HTTP/1.1 POST of 1 KiB through the proxy at addr to
// the backend, which echoes it in two writes (proctest.SplitHTTP), on a raw
// connection: one attempt, never retried.
func normalRequest(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 10*time.Second)
	if err != nil {
		return fmt.Errorf("dial: %w", err)
	}
	defer c.Close()
	return proctest.Post(c, bufio.NewReader(c), proctest.Payload, true)
}

// backend is the destination behind the proxy. A connection whose first
// line is a command runs a raw TCP scenario; a POST is echoed with head and
// body in two writes (proctest.SplitHTTP); anything else is HTTP/1.1 (1 KiB
// answers).
//
//	PUSH n   read until EOF (the client's half-close), then send n bytes, close
//	SINK     close the write side at once, read until EOF, report the count
//	FLOOD    send until the connection breaks, report the count
//	HOLD     keep the connection open until the client closes it
//	STALL    read nothing until released (see stalls), then close
type backend struct {
	addr string
	// sunk receives the byte count of each SINK/FLOOD connection when it ends.
	sunk chan int64
	// flooded is the running byte count of the current FLOOD connections.
	mu      sync.Mutex
	flooded int64
	// stalls receives each STALL connection; closing release ends them.
	stalls  chan *net.TCPConn
	release chan struct{}
}

func newBackend(t *testing.T) *backend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return serveBackend(t, ln)
}

func serveBackend(t *testing.T, ln net.Listener) *backend {
	b := &backend{addr: ln.Addr().String(), sunk: make(chan int64, 1024), stalls: make(chan *net.TCPConn, 64), release: make(chan struct{})}
	proctest.ServeBackend(t, ln, 4, b.serve)
	return b
}

// serve takes the connections that start with one of the test commands;
// the rest are HTTP.
func (b *backend) serve(first []byte, c *net.TCPConn, br *bufio.Reader) bool {
	switch string(first) {
	case "POST":
		defer c.Close()
		proctest.SplitHTTP(c, br)
		return true
	case "PUSH", "SINK", "FLOO", "HOLD", "STAL":
	default:
		return false
	}
	defer c.Close()
	line, err := br.ReadString('\n')
	if err != nil {
		return true
	}
	cmd := strings.Fields(line)
	switch cmd[0] {
	case "PUSH":
		n, _ := strconv.Atoi(cmd[1])
		_, _ = io.Copy(io.Discard, br)
		_, _ = c.Write(bytes.Repeat([]byte("p"), n))
	case "SINK":
		_ = c.CloseWrite()
		n, _ := io.Copy(io.Discard, br)
		b.sunk <- n
	case "FLOOD":
		buf := bytes.Repeat([]byte("f"), 64<<10)
		var n int64
		for {
			k, err := c.Write(buf)
			n += int64(k)
			b.mu.Lock()
			b.flooded += int64(k)
			b.mu.Unlock()
			if err != nil {
				break
			}
		}
		b.sunk <- n
	case "HOLD":
		_, _ = io.Copy(io.Discard, br)
	case "STALL":
		b.stalls <- c
		<-b.release
	}
	return true
}

func (b *backend) floodedBytes() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.flooded
}

// closedByPeer reports whether reading c ends (EOF or reset) before the
// deadline, draining whatever arrives first.
func closedByPeer(c net.Conn, within time.Duration) error {
	_ = c.SetReadDeadline(time.Now().Add(within))
	_, err := io.Copy(io.Discard, c)
	if err == nil || errors.Is(err, syscall.ECONNRESET) {
		return nil
	}
	return fmt.Errorf("connection not closed by the proxy: %w", err)
}
