package agent_test

import (
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"
)

// fdCount is the number of open descriptors of pid.
func fdCount(t *testing.T, pid int) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// settled waits until the agent runs exactly one generation, ACTIVE and
// ready, and returns its pid.
func (p *proc) settled(t *testing.T, round int) int {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		i := p.info(t)
		if len(i.Generations) == 1 && i.Generations[0].State == "ACTIVE" && i.Ready {
			return i.Generations[0].PID
		}
		if time.Now().After(deadline) {
			t.Fatalf("round %d: agent did not settle on one generation: %+v", round, i)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// agentFDs waits until the agent's descriptor count is want (the test's
// own idle HTTP connections to the status port closed) and returns it.
func (p *proc) agentFDs(t *testing.T, want int) int {
	t.Helper()
	var n int
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		http.DefaultTransport.(*http.Transport).CloseIdleConnections()
		if n = fdCount(t, p.cmd.Process.Pid); n == want {
			break
		}
	}
	return n
}

// TestHandOverChaos: hot restarts under long-lived load, and in each round
// SIGKILL of the old or the new generation at a random point of the
// hand-over (before, during or after it). Each time the agent settles on
// one serving generation, its listeners keep accepting (a fresh request is
// served), and it holds exactly the descriptors it held at the start: no
// hand-over socket leaked, none closed twice (a double close would take
// some other descriptor with it and fail the next round). L4 runs the
// default config (every connection an L4 relay); L7 the L7 config of
// TestHotRestartSoakL7, whose HTTP connections move as HTTP/1.1 sessions.
func TestHandOverChaos(t *testing.T) {
	if testing.Short() {
		t.Skip("chaos: skipped under -short")
	}
	t.Run("L4", func(t *testing.T) { handOverChaos(t, false) })
	t.Run("L7", func(t *testing.T) { handOverChaos(t, true) })
}

func handOverChaos(t *testing.T, l7 bool) {
	backend := httpBackend(t)
	p := startAgent(t, backend, "--drain-duration=2s")
	if l7 {
		writeFile(t, p.configPath, soakL7Config(backend, 10))
		if r := p.reload(t); r.Error != "" {
			t.Fatalf("reload to the L7 config: %s", r.Error)
		}
		p.waitActiveHash(t, "L7 config", configHash(t, soakL7Config(backend, 10)))
	}
	p.settled(t, 0)
	base := p.agentFDs(t, -1)
	l := startLoad(p.outbound, 3, 1, 6)
	rounds := 12
	if testing.Verbose() {
		rounds = 20
	}
	for round := 1; round <= rounds; round++ {
		old := p.settled(t, round)
		reloaded := make(chan struct{})
		go func() {
			defer close(reloaded)
			if resp, err := http.Post("http://"+p.st+"/reload", "", nil); err == nil {
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		}()
		time.Sleep(time.Duration(rand.IntN(40)) * time.Millisecond)
		victim, which := old, "old"
		if round%2 == 0 {
			for _, g := range p.info(t).Generations {
				if g.PID != old {
					victim, which = g.PID, "new"
				}
			}
		}
		if err := syscall.Kill(victim, syscall.SIGKILL); err != nil && err != syscall.ESRCH {
			t.Fatal(err)
		}
		<-reloaded
		p.settled(t, round)
		if err := get(p.outbound); err != nil {
			t.Fatalf("round %d (killed the %s generation): request after the kill: %v", round, which, err)
		}
		t.Logf("round %d: killed the %s generation (pid %d)", round, which, victim)
	}
	close(l.stop) // connections the killed generations held are lost; not counted here
	l.wg.Wait()
	p.settled(t, rounds+1)
	if n := p.agentFDs(t, base); n != base {
		t.Errorf("agent holds %d descriptors after %d rounds, %d at the start", n, rounds, base)
		ss, _ := exec.Command("ss", "-anp").CombinedOutput()
		for _, line := range strings.Split(string(ss), "\n") {
			if strings.Contains(line, fmt.Sprintf("pid=%d,", p.cmd.Process.Pid)) {
				t.Logf("%s", line)
			}
		}
	}
	if v := p.metric(t, `meshlet_agent_generation_crashes_total`); v < 1 {
		t.Errorf("crashes = %v: no kill hit a serving generation", v)
	}
}
