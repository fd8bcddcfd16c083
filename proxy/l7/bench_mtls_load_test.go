package l7_test

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/mtls/mtlstest"
)

// BenchmarkMTLSLoad is the fortio harness's load shape in one process:
// 16 keep-alive connections, each POSTing 1 KiB and reading 1 KiB back, at
// a combined MESHLET_BENCH_QPS requests per second (default 1000; 0: as
// fast as they go, the max-qps row), through two sidecars (client sidecar
// outbound → server sidecar inbound → application) in plain text
// (PERMISSIVE server, plain-text cluster) and with automatic mutual TLS
// (STRICT server), and directly to the application. One op is one
// request: run it with -benchtime 10000x for 10 s at 1000 qps. Reported:
// p50/p90/p99 latency of the requests (ms, from the write of the request to
// the last byte of the response, as fortio measures), the process's CPU per
// 1000 requests (client, sidecars and application: subtract the direct
// row's for the sidecars' share) and the requests per second achieved.
// The access log is off, as in the fortio harness.
func BenchmarkMTLSLoad(b *testing.B) {
	qps := 1000.0
	if v := os.Getenv("MESHLET_BENCH_QPS"); v != "" {
		f, err := strconv.ParseFloat(v, 64)
		if err != nil || f < 0 {
			b.Fatalf("MESHLET_BENCH_QPS=%q: want a number ≥ 0", v)
		}
		qps = f
	}
	const conns = 16
	payload := bytes.Repeat([]byte("m"), 1024)
	app := loadApp(b, payload)
	ca := mtlstest.NewCA(b)
	srvID, cliID := stores(b, ca)
	for _, tc := range []struct {
		name string
		mode string // "" : direct to the application
		mtls bool
	}{
		{"direct", "", false},
		{"plain", config.PeerPermissive, false},
		{"mtls", config.PeerStrict, true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			addr := app
			if tc.mode != "" {
				s := startSidecarLog(b, serverConfig(tc.mode), srvID, app)
				cfg := clientConfig(s, clusterHTTP1, apiID)
				if !tc.mtls {
					cfg.Clusters[0].TLS = nil
				}
				addr = startSidecarLog(b, cfg, cliID, "").out
			}
			clients := make([]*http.Client, conns)
			for i := range clients {
				clients[i] = &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
					MaxIdleConnsPerHost: 1, MaxConnsPerHost: 1, DisableCompression: true}}
				b.Cleanup(clients[i].CloseIdleConnections)
			}
			url := "http://" + addr + "/echo"
			do := func(c *http.Client) error {
				req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(payload))
				req.Host = "api.shop"
				resp, err := c.Do(req)
				if err != nil {
					return err
				}
				n, err := io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if err != nil {
					return err
				}
				if resp.StatusCode != 200 || n != int64(len(payload)) {
					return fmt.Errorf("status %d, %d bytes", resp.StatusCode, n)
				}
				return nil
			}
			// Open the connections, downstream and (16 requests at once)
			// the sidecars' pooled upstream ones, so no handshake is
			// measured.
			for range 3 {
				var wg sync.WaitGroup
				errs := make(chan error, conns)
				for _, c := range clients {
					wg.Add(1)
					go func() { defer wg.Done(); errs <- do(c) }()
				}
				wg.Wait()
				close(errs)
				for err := range errs {
					if err != nil {
						b.Fatal(err)
					}
				}
			}
			lat := make([]time.Duration, b.N)
			var next atomic.Int64
			var failed atomic.Value
			var wg sync.WaitGroup
			var r0, r1 syscall.Rusage
			_ = syscall.Getrusage(syscall.RUSAGE_SELF, &r0)
			b.ResetTimer()
			start := time.Now()
			for _, c := range clients {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for {
						k := next.Add(1) - 1
						if k >= int64(b.N) {
							return
						}
						if qps > 0 {
							if d := time.Until(start.Add(time.Duration(float64(k) / qps * float64(time.Second)))); d > 0 {
								time.Sleep(d)
							}
						}
						t0 := time.Now()
						if err := do(c); err != nil {
							failed.CompareAndSwap(nil, err)
						}
						lat[k] = time.Since(t0)
					}
				}()
			}
			wg.Wait()
			elapsed := time.Since(start)
			b.StopTimer()
			_ = syscall.Getrusage(syscall.RUSAGE_SELF, &r1)
			if err, _ := failed.Load().(error); err != nil {
				b.Fatal(err)
			}
			cpu := time.Duration(r1.Utime.Nano()-r0.Utime.Nano()) + time.Duration(r1.Stime.Nano()-r0.Stime.Nano())
			slices.Sort(lat)
			pct := func(p float64) float64 {
				return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))]) / float64(time.Millisecond)
			}
			b.ReportMetric(pct(0.50), "p50-ms")
			b.ReportMetric(pct(0.90), "p90-ms")
			b.ReportMetric(pct(0.99), "p99-ms")
			b.ReportMetric(cpu.Seconds()/float64(b.N)*1000, "cpu-s/1000req")
			b.ReportMetric(float64(b.N)/elapsed.Seconds(), "req/s")
		})
	}
}

// loadApp answers every request with body (after reading the request's).
func loadApp(b *testing.B, body []byte) string {
	b.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Length", strconv.Itoa(len(body)))
		_, _ = w.Write(body)
	})}
	go srv.Serve(ln)
	b.Cleanup(func() { srv.Close() })
	return ln.Addr().String()
}
