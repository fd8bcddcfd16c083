package l4_test

import (
	"bufio"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/test/netlab"
)

// TestPrivilegedGarbageThenCapturedRequest runs `meshlet proxy` in a netns
// with a real REDIRECT rule, so it has real original destinations. Garbage
// sent straight to 15001 and 15006 (not redirected) is closed and counted;
// garbage that was redirected is passed through to its destination (L4 does
// not judge payloads); and the same proxy then serves a normal, redirected
// request, with its memory bounded.
func TestPrivilegedGarbageThenCapturedRequest(t *testing.T) {
	ns := netlab.NewNS(t, "mlpx-")
	const client, app = "10.212.60.1", "10.212.60.2"
	for _, a := range []string{client + "/32", app + "/32"} {
		if err := ns.AddAddr("lo", a); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := ns.Run(exec.Command("iptables", "-w", "-t", "nat", "-A", "OUTPUT", "-p", "tcp",
		"-s", client, "-d", app, "--dport", "80", "-j", "REDIRECT", "--to-ports", "15001"), -1, -1); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	ln, err := ns.Listen("tcp", app+":80")
	if err != nil {
		t.Fatal(err)
	}
	serveBackend(t, ln)

	out := &proctest.SyncBuf{}
	cmd := exec.Command(os.Args[0], "proxy", "--outbound-addr", ":15001", "--inbound-addr", ":15006",
		"--health-addr", "", "--prometheus-addr", "127.0.0.1:15090", "--admin-addr", "127.0.0.1:15000", "-v")
	cmd.Env = append(os.Environ(), envExec+"=1")
	cmd.Stdout, cmd.Stderr = out, out
	if err := ns.Start(cmd, -1, -1); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		<-exited
		if t.Failed() {
			t.Logf("proxy output (last 8 KiB):\n%s", tail(out.String(), 8<<10))
		}
	})
	// dial connects inside the netns, from the client address when
	// fromClient is set (the REDIRECT rule matches only that source).
	dial := func(addr string, fromClient bool) (net.Conn, error) {
		var c net.Conn
		err := ns.Do(func() error {
			d := net.Dialer{Timeout: 5 * time.Second}
			if fromClient {
				d.LocalAddr = &net.TCPAddr{IP: net.ParseIP(client)}
			}
			var err error
			c, err = d.Dial("tcp", addr)
			return err
		})
		return c, err
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(_ context.Context, _, addr string) (net.Conn, error) {
			host, _, _ := net.SplitHostPort(addr)
			return dial(addr, host == app)
		}}}
	metric := func(name string) float64 {
		resp, err := hc.Get("http://127.0.0.1:15090/stats/prometheus")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindSubmatch(body)
		if m == nil {
			t.Fatalf("metric %s not in:\n%s", name, body)
		}
		v, _ := strconv.ParseFloat(string(m[1]), 64)
		return v
	}
	// request is one POST echoed in two writes, on a raw connection: one
	// attempt, never retried.
	request := func() error {
		c, err := dial(net.JoinHostPort(app, "80"), true)
		if err != nil {
			return fmt.Errorf("dial: %w", err)
		}
		defer c.Close()
		return proctest.Post(c, bufio.NewReader(c), proctest.Payload, true)
	}
	deadline := time.Now().Add(20 * time.Second)
	for request() != nil {
		if time.Now().After(deadline) {
			t.Fatalf("proxy not serving the redirected request: %v", request())
		}
		time.Sleep(20 * time.Millisecond)
	}
	baseRSS := procStatus(t, cmd.Process.Pid, "VmRSS")
	origBefore := metric(errOrigDst)
	fwdBefore := metric(`meshlet_proxy_connections_total{direction="outbound"}`)

	const each = 30
	var wg sync.WaitGroup
	for _, target := range []struct {
		addr       string
		fromClient bool
	}{{"127.0.0.1:15001", false}, {"127.0.0.1:15006", false}, {app + ":80", true}} {
		for i := 0; i < each; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := dial(target.addr, target.fromClient)
				if errors.Is(err, syscall.ECONNRESET) {
					return
				}
				if err != nil {
					t.Error(err)
					return
				}
				defer c.Close()
				garbage := make([]byte, 32<<10)
				_, _ = rand.Read(garbage)
				_, _ = c.Write(garbage)
				if err := closedByPeer(c, 10*time.Second); err != nil {
					t.Errorf("%s: %v", target.addr, err)
				}
			}()
		}
	}
	wg.Wait()
	if got := metric(errOrigDst) - origBefore; got != 2*each {
		t.Errorf("garbage without a redirect: %s grew by %v, want %d", errOrigDst, got, 2*each)
	}
	if got := metric(`meshlet_proxy_connections_total{direction="outbound"}`) - fwdBefore; got < 2*each {
		t.Errorf("outbound connections grew by %v, want at least %d (direct and redirected garbage)", got, 2*each)
	}
	select {
	case <-exited:
		t.Fatal("proxy exited")
	default:
	}
	if err := request(); err != nil {
		t.Errorf("redirected request after garbage: %v", err)
	}
	rss := procStatus(t, cmd.Process.Pid, "VmRSS")
	t.Logf("proxy RSS %d kB (at start %d kB)", rss, baseRSS)
	if rss-baseRSS > 32<<10 {
		t.Errorf("proxy RSS grew from %d kB to %d kB", baseRSS, rss)
	}
}
