package agent_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/proctest"
)

// TestSIGINTToProcessGroupDrains: SIGINT to the agent's whole process group
// (a terminal's Ctrl-C) drains like SIGTERM: readiness fails, new inbound is
// refused, outbound keeps working — the generation, in its own process
// group, does not see the SIGINT and hot-restart-drain itself — and the
// agent exits 0 once the last connection has gone.
func TestSIGINTToProcessGroupDrains(t *testing.T) {
	p := startAgent(t, httpBackend(t), "--drain-duration=20s")
	gen := activePID(t, p)
	stream, err := net.Dial("tcp", p.outbound)
	if err != nil {
		t.Fatal(err)
	}
	defer stream.Close()
	if _, err := stream.Write([]byte("S")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(stream, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Kill(-p.cmd.Process.Pid, syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	// The agent's readiness, then the generation's own state (it drains
	// once it has read the agent's command).
	deadline := time.Now().Add(10 * time.Second)
	for _, url := range []string{"http://" + p.st + "/healthz/ready", "http://" + p.admin + "/ready"} {
		for {
			code, _ := proctest.HTTPGet(url)
			if code == http.StatusServiceUnavailable {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s still %d after SIGINT", url, code)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	if c, err := net.DialTimeout("tcp", p.inbound, time.Second); err == nil {
		_ = c.SetReadDeadline(time.Now().Add(time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil || os.IsTimeout(err) {
			t.Errorf("new inbound connection accepted while draining")
		}
		c.Close()
	}
	// Outbound keeps working: new connections and the open stream.
	for i := 0; i < 5; i++ {
		if err := get(p.outbound); err != nil {
			t.Fatalf("outbound request %d while draining after SIGINT: %v", i, err)
		}
	}
	if _, err := stream.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(stream, make([]byte, 1)); err != nil {
		t.Fatalf("outbound stream cut after SIGINT: %v", err)
	}
	if pid := p.info(t).Generations[0].PID; pid != gen {
		t.Errorf("generation %d replaced by %d after SIGINT", gen, pid)
	}
	stream.Close()
	p.waitCleanExit(t, 15*time.Second, "after SIGINT and the last connection closing")
	if !strings.Contains(p.out.String(), `msg="shutting down: draining"`) {
		t.Errorf("no shutdown drain in the log")
	}
}

// TestUserSignalsForwarded: SIGUSR1 and SIGUSR2 sent to the agent reach the
// serving generation (its counters, through the agent's merged metrics) —
// neither the agent nor the generation dies of them (Go's default action) —
// and SIGUSR2 toggles the generation's debug logging.
func TestUserSignalsForwarded(t *testing.T) {
	p := startAgent(t, httpBackend(t))
	gen := activePID(t, p)
	send := func(s syscall.Signal) {
		t.Helper()
		if err := p.cmd.Process.Signal(s); err != nil {
			t.Fatal(err)
		}
	}
	waitMetric := func(name string, want float64) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			v := p.metricOr(name, -1)
			if v == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s = %v, want %v", name, v, want)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	send(syscall.SIGUSR1)
	waitMetric(`meshlet_proxy_signals_total{signal="SIGUSR1"}`, 1)
	send(syscall.SIGUSR2)
	waitMetric(`meshlet_proxy_signals_total{signal="SIGUSR2"}`, 1)
	waitMetric(`meshlet_agent_signals_forwarded_total{signal="SIGUSR2"}`, 1)
	// The counter moves just before the line is logged.
	waitLog := func(line string) bool {
		for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
			if strings.Contains(p.out.String(), line) {
				return true
			}
		}
		return false
	}
	if !waitLog("signal=SIGUSR2 debug=true") {
		t.Errorf("SIGUSR2 did not turn on debug logging")
	}
	send(syscall.SIGUSR2)
	waitMetric(`meshlet_proxy_signals_total{signal="SIGUSR2"}`, 2)
	if !waitLog("signal=SIGUSR2 debug=false") {
		t.Errorf("second SIGUSR2 did not turn debug logging off")
	}
	if err := get(p.outbound); err != nil {
		t.Errorf("request after user signals: %v", err)
	}
	if pid := activePID(t, p); pid != gen {
		t.Errorf("generation %d replaced by %d", gen, pid)
	}
	if v := p.metric(t, `meshlet_agent_generation_crashes_total`); v != 0 {
		t.Errorf("crashes = %v", v)
	}
	select {
	case err := <-p.exited:
		p.exited <- err
		t.Fatalf("agent exited: %v", err)
	default:
	}
}

// TestAgentHelpSignalTable: `meshlet agent --help` documents every signal
// the agent handles.
func TestAgentHelpSignalTable(t *testing.T) {
	cmd := exec.Command(os.Args[0], "agent", "--help")
	cmd.Env = append(os.Environ(), envExec+"=1")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	for _, want := range []string{"SIGTERM, SIGINT", "SIGHUP", "SIGUSR1, SIGUSR2", "SIGCHLD", "SIGQUIT"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("agent --help lacks %q:\n%s", want, out)
		}
	}
}

// TestCrashQueuedConnectionsServed: connections that arrive while no
// generation accepts wait in the agent's listen backlog and are served by
// the next generation. The serving generation is stopped (SIGSTOP: it
// accepts nothing), requests are sent on new connections, then it is
// killed; twice, so the second restart also waits out the crash backoff.
func TestCrashQueuedConnectionsServed(t *testing.T) {
	p := startAgent(t, httpBackend(t))
	for round := 1; round <= 2; round++ {
		pid := activePID(t, p)
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		waitStopped(t, pid)
		var queued []net.Conn
		for i := 0; i < 20; i++ {
			c, err := net.DialTimeout("tcp", p.outbound, 5*time.Second)
			if err != nil {
				t.Fatalf("round %d: dial %d: %v", round, i, err)
			}
			defer c.Close()
			if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); err != nil {
				t.Fatal(err)
			}
			queued = append(queued, c)
		}
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		for i, c := range queued {
			_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Errorf("round %d: queued connection %d: %v", round, i, err)
				continue
			}
			n, err := io.Copy(io.Discard, resp.Body)
			if resp.StatusCode != 200 || n != 1024 || err != nil {
				t.Errorf("round %d: queued connection %d: %d, %d bytes, %v", round, i, resp.StatusCode, n, err)
			}
			c.Close()
		}
		if v := p.metric(t, `meshlet_agent_generation_crashes_total`); v != float64(round) {
			t.Errorf("round %d: crashes = %v", round, v)
		}
		if pid2 := activePID(t, p); pid2 == pid {
			t.Errorf("round %d: generation %d not replaced", round, pid)
		}
	}
	// The second crash came soon after the first restart: it waits out the
	// first backoff step — announced, and applied: the next generation
	// starts no sooner than 200ms after the crash was seen (a timer never
	// fires early, so this lower bound holds on a loaded machine).
	log := p.out.String()
	if !strings.Contains(log, fmt.Sprintf("in=%s", 200*time.Millisecond)) {
		t.Errorf("second restart did not announce the 200ms crash backoff; log:\n%s", log)
	}
	died, started, err := secondRestart(log)
	if err != nil {
		t.Fatalf("%v; log:\n%s", err, log)
	}
	// The log's timestamps have millisecond precision: allow 1ms for it.
	if gap := started.Sub(died); gap < 199*time.Millisecond {
		t.Errorf("the generation after the second crash started %v after it, want the 200ms backoff; log:\n%s", gap, log)
	}
}

// secondRestart returns when the agent logged the second generation crash
// and when it logged starting the generation after it.
func secondRestart(log string) (died, started time.Time, err error) {
	stamp := func(line string) (time.Time, error) {
		f, _, _ := strings.Cut(strings.TrimSpace(line), " ")
		v, ok := strings.CutPrefix(f, "time=")
		if !ok {
			return time.Time{}, fmt.Errorf("log line without a time: %q", line)
		}
		return time.Parse(time.RFC3339Nano, v)
	}
	crashes := 0
	for _, line := range strings.Split(log, "\n") {
		switch {
		case strings.Contains(line, `msg="generation died; restarting"`):
			crashes++
			if crashes == 2 {
				if died, err = stamp(line); err != nil {
					return died, started, err
				}
			}
		case crashes == 2 && strings.Contains(line, `msg="generation starting"`):
			started, err = stamp(line)
			return died, started, err
		}
	}
	return died, started, fmt.Errorf("no generation started after the second crash (%d crashes logged)", crashes)
}

// waitStopped waits until every thread of pid is stopped: kill(2) returns
// before a group stop has reached all of them.
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		tasks, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
		stopped := 0
		for _, task := range tasks {
			b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/stat", pid, task.Name()))
			if i := strings.LastIndexByte(string(b), ')'); i > 0 && len(b) > i+2 && b[i+2] == 'T' {
				stopped++
			}
		}
		if len(tasks) > 0 && stopped == len(tasks) {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("generation %d not stopped (%d of %d threads)", pid, stopped, len(tasks))
		}
		time.Sleep(time.Millisecond)
	}
}
