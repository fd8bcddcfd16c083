package l7_test

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/stats"
)

// envHold makes the test binary hold keep-alive HTTP/1.1 client connections
// for BenchmarkHandOverHTTP1 (value "address,n"): see holdClients.
const envHold = "MLL7_HOLD"

// holdClients opens n keep-alive connections to addr and sends one POST on
// each, prints "ready", waits for a line on stdin, sends one more POST on
// each connection and prints "ok" (or the first error). It returns the exit
// code. At most 50 requests are in flight at once, so the proxy needs few
// upstream connections.
func holdClients(spec string) int {
	addr, ns, _ := strings.Cut(spec, ",")
	n, err := strconv.Atoi(ns)
	if err != nil {
		fmt.Println("error", err)
		return 1
	}
	conns := make([]net.Conn, n)
	readers := make([]*bufio.Reader, n)
	each := func(f func(i int) error) error {
		var mu sync.Mutex
		var first error
		var wg sync.WaitGroup
		sem := make(chan struct{}, 50)
		for i := range n {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				if err := f(i); err != nil {
					mu.Lock()
					if first == nil {
						first = fmt.Errorf("connection %d: %w", i, err)
					}
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		return first
	}
	if err := each(func(i int) error {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			return err
		}
		conns[i], readers[i] = c, bufio.NewReader(c)
		_, err = proctest.PostTo(c, readers[i], "web", []byte("first"), false)
		return err
	}); err != nil {
		fmt.Println("error", err)
		return 1
	}
	fmt.Println("ready")
	if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
		fmt.Println("error", err)
		return 1
	}
	if err := each(func(i int) error {
		resp, err := proctest.PostTo(conns[i], readers[i], "web", []byte("second"), false)
		if err == nil && resp.Close {
			err = fmt.Errorf("answered with Connection: close after the restart")
		}
		return err
	}); err != nil {
		fmt.Println("error", err)
		return 1
	}
	fmt.Println("ok")
	return 0
}

// procStatusKiB reads a "Vm…:  N kB" field of /proc/self/status.
func procStatusKiB(b *testing.B, field string) int64 {
	b.Helper()
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			if err != nil {
				b.Fatal(err)
			}
			return n
		}
	}
	b.Fatalf("no %s in /proc/self/status", field)
	return 0
}

// BenchmarkHandOverHTTP1 measures a hot restart of a generation holding n
// idle HTTP/1.1 keep-alive connections of the L7 engine: from the hand-over
// command until the new generation has adopted every connection. Reported:
// ms per restart, µs per connection, and how much the process's peak RSS
// grew during the restart (both generations live in this process, so this
// is the connections' state held twice, not a second runtime). The clients
// are a child process (this binary, MLL7_HOLD), so the proxy's one
// descriptor per connection fits RLIMIT_NOFILE; every connection is used
// once more afterwards and must not have been closed.
func BenchmarkHandOverHTTP1(b *testing.B) {
	var lim syscall.Rlimit
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(w, r.Body)
	})}
	go hs.Serve(ln)
	b.Cleanup(func() { hs.Close() })
	conf := fmt.Sprintf(`
ports: [{port: 80, name: http-web}]
services: [{name: web, hosts: [web], routes: [{name: r, destinations: [{cluster: web}]}]}]
clusters: [{name: web, endpoints: [{address: %q}]}]
`, ln.Addr().String())
	for _, n := range []int{100, 1000, 10000} {
		b.Run(fmt.Sprintf("conns=%d", n), func(b *testing.B) {
			if need := uint64(n + 1000); need > lim.Cur {
				b.Skipf("needs %d descriptors, RLIMIT_NOFILE is %d", need, lim.Cur)
			}
			var total time.Duration
			var peakKiB int64
			for range b.N {
				b.StopTimer()
				pl, err := net.Listen("tcp", "127.0.0.1:0")
				if err != nil {
					b.Fatal(err)
				}
				shared := pl.(*net.TCPListener)
				st := stats.NewPrivate()
				g1 := startGeneration(b, shared, conf, st, nil)
				child := exec.Command(os.Args[0], "-test.run=^$")
				child.Env = append(os.Environ(), envHold+"="+shared.Addr().String()+","+strconv.Itoa(n))
				stdin, _ := child.StdinPipe()
				stdout, _ := child.StdoutPipe()
				child.Stderr = os.Stderr
				if err := child.Start(); err != nil {
					b.Fatal(err)
				}
				out := bufio.NewReader(stdout)
				if line, err := out.ReadString('\n'); err != nil || line != "ready\n" {
					b.Fatalf("clients: %q %v", line, err)
				}
				oldEnd, newEnd := proctest.HandoverPair(b)
				g2 := startGeneration(b, shared, conf, st, newEnd)
				if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil {
					b.Fatalf("resetting the peak RSS: %v", err)
				}
				rss := procStatusKiB(b, "VmRSS")
				adopted := `meshlet_proxy_adopted_connections_total{direction="outbound"}`
				b.StartTimer()
				t0 := time.Now()
				g1.HandOver(oldEnd)
				for counter(st, adopted) < uint64(n) {
					time.Sleep(100 * time.Microsecond)
				}
				total += time.Since(t0)
				b.StopTimer()
				peakKiB += procStatusKiB(b, "VmHWM") - rss
				g1.Wait()
				if _, err := io.WriteString(stdin, "go\n"); err != nil {
					b.Fatal(err)
				}
				if line, err := out.ReadString('\n'); err != nil || line != "ok\n" {
					b.Fatalf("clients after the hand-over: %q %v", line, err)
				}
				if err := child.Wait(); err != nil {
					b.Fatal(err)
				}
				g2.Close()
				g2.Wait()
				g1.Close()
				shared.Close()
			}
			b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/restart")
			b.ReportMetric(float64(total.Microseconds())/float64(b.N*n), "µs/conn")
			b.ReportMetric(float64(peakKiB)/float64(b.N), "KiB-peak-growth")
		})
	}
}
