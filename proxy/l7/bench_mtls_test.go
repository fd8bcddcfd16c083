package l7_test

import (
	"io"
	"net/http"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/mtls/mtlstest"
)

// BenchmarkMTLS: requests through two sidecars (client sidecar outbound,
// server sidecar inbound, then the application), all in this process on
// loopback, over one keep-alive connection per caller: plain text
// (PERMISSIVE server, plain-text client cluster) against mutual TLS
// (STRICT server, automatic mutual TLS). cpu-ns/op is the process's user
// plus system CPU per request (client, both sidecars and the application).
func BenchmarkMTLS(b *testing.B) {
	ca := mtlstest.NewCA(b)
	srvID, cliID := stores(b, ca)
	for _, tc := range []struct {
		name  string
		mode  string
		proto string
		mtls  bool
	}{
		{"http1/plain", config.PeerPermissive, clusterHTTP1, false},
		{"http1/mtls", config.PeerStrict, clusterHTTP1, true},
		{"http2/plain", config.PeerPermissive, config.ProtoHTTP2, false},
		{"http2/mtls", config.PeerStrict, config.ProtoHTTP2, true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			s := startSidecar(b, serverConfig(tc.mode), srvID, echoApp(b))
			cfg := clientConfig(s, tc.proto, apiID)
			if !tc.mtls {
				cfg.Clusters[0].TLS = nil
			}
			c := startSidecar(b, cfg, cliID, "")
			hc := &http.Client{Timeout: 5 * time.Second}
			req, _ := http.NewRequest(http.MethodGet, "http://"+c.out+"/x", nil)
			req.Host = "api.shop"
			do := func() {
				resp, err := hc.Do(req)
				if err != nil {
					b.Fatal(err)
				}
				_, _ = io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if resp.StatusCode != 200 {
					b.Fatalf("status %d", resp.StatusCode)
				}
			}
			do()
			var r0, r1 syscall.Rusage
			_ = syscall.Getrusage(syscall.RUSAGE_SELF, &r0)
			b.ResetTimer()
			for range b.N {
				do()
			}
			b.StopTimer()
			_ = syscall.Getrusage(syscall.RUSAGE_SELF, &r1)
			cpu := time.Duration(r1.Utime.Nano()-r0.Utime.Nano()) + time.Duration(r1.Stime.Nano()-r0.Stime.Nano())
			b.ReportMetric(float64(cpu.Nanoseconds())/float64(b.N), "cpu-ns/op")
		})
	}
}
