package agent_test

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/proctest"
)

func get(addr string) error {
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + addr + "/")
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	n, err := io.Copy(io.Discard, resp.Body)
	if err != nil || n != 1024 {
		return fmt.Errorf("read %d bytes: %v", n, err)
	}
	return nil
}

func activePID(t *testing.T, p *proc) int {
	t.Helper()
	for _, g := range p.info(t).Generations {
		if g.State == "ACTIVE" {
			return g.PID
		}
	}
	t.Fatal("no active generation")
	return 0
}

// TestKill9BacklogServed: with the serving generation killed, connections
// made before the next one is up wait in the agent's listen backlog and are
// served by it.
func TestKill9BacklogServed(t *testing.T) {
	p := startAgent(t, httpBackend(t))
	pid := activePID(t, p)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := get(p.outbound); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("request after kill -9: %v", err)
	}
	if v := p.metric(t, `meshlet_agent_generation_crashes_total`); v != 1 {
		t.Errorf("crashes = %v", v)
	}
	if pid2 := activePID(t, p); pid2 == pid {
		t.Errorf("generation not replaced")
	}
}

// TestBadConfigKeepsServing: an invalid config is rejected with the field
// named, reported in the proxy's /server_info and the metric, and the
// running generation keeps serving.
func TestBadConfigKeepsServing(t *testing.T) {
	p := startAgent(t, httpBackend(t))
	gen := p.info(t).ActiveGeneration
	if err := os.WriteFile(p.configPath, []byte("apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\noutbound:\n  idleTimeout: 1ns\n  bogus: 1\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := p.reload(t)
	if !strings.Contains(r.Error, "bogus") {
		t.Errorf("reload error %q does not name the bad field", r.Error)
	}
	if err := get(p.outbound); err != nil {
		t.Errorf("old generation stopped serving: %v", err)
	}
	_, body := proctest.HTTPGet("http://" + p.admin + "/server_info")
	if !strings.Contains(body, "bogus") {
		t.Errorf("proxy /server_info does not report the failure: %s", body)
	}
	if v := p.metric(t, `meshlet_agent_reloads_total{result="failure"}`); v < 1 {
		t.Errorf("failure metric = %v", v)
	}
	if g := p.info(t).ActiveGeneration; g != gen {
		t.Errorf("active generation changed %d → %d", gen, g)
	}
	// A proxy that rejects its config at start (the agent's own check passed)
	// is covered by --proxy-arg garbage below.
	if err := os.WriteFile(p.configPath, fmt.Appendf(nil, goodConfig, 5), 0o644); err != nil {
		t.Fatal(err)
	}
	if r := p.reload(t); r.Error != "" || r.Generation <= gen {
		t.Errorf("reload after fix: %+v", r)
	}
	_, body = proctest.HTTPGet("http://" + p.admin + "/server_info")
	if strings.Contains(body, "lastReloadError") {
		t.Errorf("failure still reported after a good reload: %s", body)
	}
}

// TestFailedStartKeepsServing: a generation that cannot start (bad flag)
// leaves the current one serving. The agent is started with a good proxy,
// then a reload is attempted with a broken executable path swapped in via
// a wrapper script that fails.
func TestFailedStartKeepsServing(t *testing.T) {
	dir := t.TempDir()
	flag := dir + "/fail"
	script := dir + "/meshlet"
	// The wrapper runs the real binary unless the flag file exists.
	if err := os.WriteFile(script, []byte("#!/bin/sh\nif [ -e "+flag+" ]; then echo broken >&2; exit 3; fi\nexec "+os.Args[0]+" \"$@\"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	p := startAgentExe(t, httpBackend(t), script)
	if err := os.WriteFile(flag, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	r := p.reload(t)
	if !strings.Contains(r.Error, "exited") {
		t.Errorf("reload error = %q", r.Error)
	}
	if err := get(p.outbound); err != nil {
		t.Errorf("old generation stopped serving: %v", err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for len(p.info(t).Generations) != 1 {
		if time.Now().After(deadline) {
			t.Fatalf("failed generation not reaped: %+v", p.info(t).Generations)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestSIGTERMDrain: SIGTERM fails readiness, refuses new inbound, keeps
// outbound working, and the agent exits once the last connection closes,
// before the deadline.
func TestSIGTERMDrain(t *testing.T) {
	p := startAgent(t, httpBackend(t), "--drain-duration=20s")
	stream, err := net.Dial("tcp", p.inbound)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Write([]byte("S")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(stream, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		code, _ := proctest.HTTPGet("http://" + p.st + "/healthz/ready")
		if code == http.StatusServiceUnavailable {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("readiness still %d after SIGTERM", code)
		}
		time.Sleep(20 * time.Millisecond)
	}
	// Readiness fails as soon as the agent starts draining; the generation
	// closes its inbound listener when the drain command reaches it, a
	// moment later. From then on new inbound connections are refused.
	refused := func() bool {
		c, err := net.DialTimeout("tcp", p.inbound, time.Second)
		if err != nil {
			return true
		}
		defer c.Close()
		_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
		_, err = c.Read(make([]byte, 1))
		return err != nil && !os.IsTimeout(err)
	}
	for deadline := time.Now().Add(5 * time.Second); !refused(); {
		if time.Now().After(deadline) {
			t.Fatal("new inbound connections still accepted 5s into the drain")
		}
	}
	if err := get(p.outbound); err != nil {
		t.Errorf("outbound broken while draining: %v", err)
	}
	// The open inbound stream still works.
	if _, err := stream.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(stream, make([]byte, 1)); err != nil {
		t.Fatalf("inbound stream cut by drain: %v", err)
	}
	stream.Close()
	p.waitCleanExit(t, 15*time.Second, "after the last connection closed")
	if d := time.Since(t0); d > 10*time.Second {
		t.Errorf("took %v", d)
	}
}

func TestQuitQuitQuit(t *testing.T) {
	p := startAgent(t, httpBackend(t))
	pid := activePID(t, p)
	resp, err := http.Post("http://"+p.st+"/quitquitquit", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	p.waitCleanExit(t, 5*time.Second, "after /quitquitquit")
	time.Sleep(100 * time.Millisecond)
	if err := syscall.Kill(pid, 0); err == nil {
		t.Errorf("generation %d survived the agent", pid)
	}
}

func TestAgentWait(t *testing.T) {
	p := startAgent(t, httpBackend(t))
	cmd := exec.Command(os.Args[0], "agent", "wait", "--url", "http://"+p.st+"/healthz/ready", "--timeout", "5s")
	cmd.Env = append(os.Environ(), envExec+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("wait: %v %s", err, out)
	}
	cmd = exec.Command(os.Args[0], "agent", "wait", "--url", "http://"+proctest.FreePort(t)+"/healthz/ready", "--timeout", "300ms")
	cmd.Env = append(os.Environ(), envExec+"=1")
	out, err = cmd.CombinedOutput()
	if err == nil || !strings.Contains(string(out), "sidecar not ready after 300ms") {
		t.Errorf("wait on a dead URL: %v %s", err, out)
	}
}

// TestDrainEndpoint: POST /drain fails readiness and stops inbound while
// outbound keeps working; the agent stays up and does not restart the
// drained generation.
func TestDrainEndpoint(t *testing.T) {
	p := startAgent(t, httpBackend(t), "--drain-duration=3s")
	resp, err := http.Post("http://"+p.st+"/drain", "", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		if code, _ := proctest.HTTPGet("http://" + p.st + "/healthz/ready"); code == http.StatusServiceUnavailable {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("still ready after /drain")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := get(p.outbound); err != nil {
		t.Errorf("outbound broken after /drain: %v", err)
	}
	if r := p.reload(t); r.Error == "" {
		t.Errorf("reload accepted while drained: %+v", r)
	}
	select {
	case err := <-p.exited:
		p.exited <- err
		t.Fatalf("agent exited after /drain: %v", err)
	case <-time.After(500 * time.Millisecond):
	}
}
