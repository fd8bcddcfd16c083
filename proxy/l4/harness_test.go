package l4_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/cmd/meshlet/app"
	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/test/netlab"
)

// envExec makes the test binary behave as the meshlet binary, so the tests
// below run `meshlet proxy` as a real process with real sockets.
const envExec = "MESHLET_TEST_EXEC_MESHLET"

func TestMain(m *testing.M) {
	if os.Getenv(envExec) == "1" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		err := app.Run(ctx, os.Args[1:], cli.Streams{In: os.Stdin, Out: os.Stdout, Err: os.Stderr})
		stop()
		os.Exit(cli.ExitCode(err, os.Stderr))
	}
	code := m.Run()
	netlab.RemoveSelfCopy()
	os.Exit(code)
}

// freePort returns a loopback address that was free a moment ago.
func freePort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// proxyProc is a running `meshlet proxy` process on loopback ports.
type proxyProc struct {
	cmd                            *exec.Cmd
	out                            *syncBuf
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
	p := &proxyProc{out: &syncBuf{}, exited: make(chan struct{})}
	p.outbound, p.inbound, p.prom, p.admin = freePort(t), freePort(t), freePort(t), freePort(t)
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
		if code, _ := httpGet("http://" + p.admin + "/ready"); code == http.StatusOK {
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
	_, body := httpGet("http://" + p.prom + "/stats/prometheus")
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

func httpGet(url string) (int, string) {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// normalRequest is one HTTP/1.1 request through the proxy at addr to the
// backend, which answers 1 KiB.
func normalRequest(addr string) error {
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if err != nil || n != 1024 || resp.StatusCode != http.StatusOK {
		return fmt.Errorf("status %d, read %d bytes: %v", resp.StatusCode, n, err)
	}
	return nil
}

// backend is the destination behind the proxy. A connection whose first
// line is a command runs a raw TCP scenario; anything else is HTTP/1.1
// (1 KiB answers).
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
	payload := bytes.Repeat([]byte("x"), 1024)
	hl := &chanListener{ch: make(chan net.Conn, 128), addr: ln.Addr(), done: make(chan struct{})}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		_, _ = w.Write(payload)
	})}
	go func() { _ = hs.Serve(hl) }()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go b.serve(c.(*net.TCPConn), hl)
		}
	}()
	t.Cleanup(func() { ln.Close(); close(hl.done); hs.Close() })
	return b
}

func (b *backend) serve(c *net.TCPConn, hl *chanListener) {
	br := bufio.NewReader(c)
	first, err := br.Peek(4)
	if err != nil {
		c.Close()
		return
	}
	switch string(first) {
	case "PUSH", "SINK", "FLOO", "HOLD", "STAL":
	default:
		hl.ch <- &peekedConn{Conn: c, r: br}
		return
	}
	defer c.Close()
	line, err := br.ReadString('\n')
	if err != nil {
		return
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
}

func (b *backend) floodedBytes() int64 {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.flooded
}

type peekedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *peekedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

type chanListener struct {
	ch   chan net.Conn
	addr net.Addr
	done chan struct{}
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}
func (l *chanListener) Close() error   { return nil }
func (l *chanListener) Addr() net.Addr { return l.addr }

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
