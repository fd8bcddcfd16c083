package agent_test

import (
	"bufio"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/agent"
)

// BenchmarkHotRestartPSS measures the memory a hot restart adds while the
// old and the new generation live side by side as separate processes. The
// real meshlet binary (CGO_ENABLED=0 go build -trimpath -ldflags '-s -w'
// ./cmd/meshlet, as make build; MESHLET=path runs a prebuilt one) is the
// agent and every generation, under the soak's load through the outbound
// listener (4 keep-alive and 2 one-shot POST clients, an echo, an event and
// a database stream each twice); one POST /reload per iteration.
//
// Proportional set sizes come from /proc/PID/smaps_rollup: of the one
// generation (and the agent) before each restart, and in a tight loop over
// the agent's children while two generations live; the sums are what the
// pod's processes hold in memory at that moment (PSS divides every shared
// page among the processes mapping it, so a sum counts each page once).
// Reported, each the median over the restarts:
//
//	gen-MiB       the generation before the restart
//	both-MiB      the largest sum of both generations' PSS during the restart
//	extra-MiB     both-MiB - gen-MiB (extra-max-MiB: its largest value)
//	pod-MiB       agent + generation before the restart
//	pod-peak-MiB  the largest agent + generations sum during the restart
//	new-MiB       the new generation's largest PSS while two lived, and
//	new-file-MiB  the file-backed part of it (the binary's pages its
//	              start-up touched, before it unmaps them once ready)
//	samples       PSS samples taken while two generations lived
func BenchmarkHotRestartPSS(b *testing.B) {
	bin := meshletBinary(b)
	for _, tc := range []struct {
		name string
		l7   bool
	}{{"L4", false}, {"L7", true}} {
		b.Run(tc.name, func(b *testing.B) {
			backend := httpBackend(b)
			p := launchAgentBin(b, bin, backend, bin, nil, "--drain-duration=2s")
			p.waitReady(b)
			if tc.l7 {
				writeFile(b, p.configPath, soakL7Config(backend, 10))
				if r := p.reload(b); r.Error != "" {
					b.Fatalf("reload to the L7 config: %s", r.Error)
				}
				p.waitActiveHash(b, "L7 config", configHash(b, soakL7Config(backend, 10)))
			}
			l := startLoad(p.outbound, 4, 2, 6)
			agentPID := p.cmd.Process.Pid
			var gen, both, extra, pod, podPeak, newPSS, newFile, samples []float64
			b.ResetTimer()
			for i := range b.N {
				old := settledChild(b, p, agentPID, i)
				time.Sleep(500 * time.Millisecond) // steady under load
				g, a := pssMiB(old), pssMiB(agentPID)
				done := make(chan agent.ReloadResult, 1)
				go func() {
					resp, err := http.Post("http://"+p.st+"/reload", "", nil)
					var r agent.ReloadResult
					if err != nil {
						r.Error = err.Error()
					} else {
						resp.Body.Close()
					}
					done <- r
				}()
				var maxBoth, maxPod, maxNew, maxNewFile float64
				n := 0
				replied := false
				for deadline := time.Now().Add(20 * time.Second); ; {
					if !replied {
						select {
						case r := <-done:
							if r.Error != "" {
								b.Fatalf("reload %d: %s", i, r.Error)
							}
							replied = true
						default:
						}
					}
					kids := children(agentPID)
					if len(kids) >= 2 {
						sum := 0.0
						for _, k := range kids {
							v := pssMiB(k)
							sum += v
							if k != old && v > maxNew {
								maxNew, maxNewFile = v, pssFileMiB(k)
							}
						}
						maxBoth = max(maxBoth, sum)
						maxPod = max(maxPod, sum+pssMiB(agentPID))
						n++
					}
					if replied && len(kids) == 1 && kids[0] != old {
						break
					}
					if time.Now().After(deadline) {
						b.Fatalf("restart %d not complete within 20 s: children %v", i, kids)
					}
				}
				gen, both, extra = append(gen, g), append(both, maxBoth), append(extra, maxBoth-g)
				pod, podPeak, samples = append(pod, g+a), append(podPeak, maxPod), append(samples, float64(n))
				newPSS, newFile = append(newPSS, maxNew), append(newFile, maxNewFile)
			}
			b.StopTimer()
			l.finish(b)
			b.ReportMetric(median(gen), "gen-MiB")
			b.ReportMetric(median(both), "both-MiB")
			b.ReportMetric(median(extra), "extra-MiB")
			b.ReportMetric(slices.Max(extra), "extra-max-MiB")
			b.ReportMetric(median(pod), "pod-MiB")
			b.ReportMetric(median(podPeak), "pod-peak-MiB")
			b.ReportMetric(median(newPSS), "new-MiB")
			b.ReportMetric(median(newFile), "new-file-MiB")
			b.ReportMetric(median(samples), "samples")
		})
	}
}

// meshletBinary returns $MESHLET, or builds cmd/meshlet as make build does.
func meshletBinary(b *testing.B) string {
	if bin := os.Getenv("MESHLET"); bin != "" {
		return bin
	}
	bin := filepath.Join(b.TempDir(), "meshlet")
	cmd := exec.Command("go", "build", "-trimpath", "-ldflags", "-s -w", "-o", bin, "github.com/meshlet/meshlet/cmd/meshlet")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		b.Fatalf("go build: %v\n%s", err, out)
	}
	return bin
}

// settledChild waits until the agent runs one generation, ACTIVE, and
// has one child process, and returns its pid.
func settledChild(b *testing.B, p *proc, agentPID, round int) int {
	b.Helper()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		i := p.info(b)
		if kids := children(agentPID); len(kids) == 1 && len(i.Generations) == 1 && i.Generations[0].State == "ACTIVE" && i.Generations[0].PID == kids[0] {
			return kids[0]
		}
		if time.Now().After(deadline) {
			b.Fatalf("round %d: the agent did not settle on one generation: %+v", round, i)
		}
	}
}

// children lists pid's child processes.
func children(pid int) []int {
	tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
	var kids []int
	for _, f := range tasks {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, s := range strings.Fields(string(b)) {
			if k, err := strconv.Atoi(s); err == nil {
				kids = append(kids, k)
			}
		}
	}
	return kids
}

// pssMiB is pid's proportional set size in MiB (0 once it has gone).
func pssMiB(pid int) float64 { return smapsMiB(pid, "Pss:") }

// pssFileMiB is the file-backed part of pid's PSS in MiB.
func pssFileMiB(pid int) float64 { return smapsMiB(pid, "Pss_File:") }

// smapsMiB reads field (e.g. "Pss:") of pid's smaps_rollup, in MiB.
func smapsMiB(pid int, field string) float64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), field); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 64)
			return kb / 1024
		}
	}
	return 0
}

func median(v []float64) float64 {
	v = slices.Clone(v)
	slices.Sort(v)
	if len(v) == 0 {
		return 0
	}
	return v[(len(v)-1)/2]
}
