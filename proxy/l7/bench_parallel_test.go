package l7

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	testpb "google.golang.org/grpc/interop/grpc_testing"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
)

// BenchmarkHTTP1Parallel measures throughput with 16 concurrent keep-alive
// clients (as the fortio runs in docs/design.md §8): direct, one L7 hop, two L7
// hops (client sidecar outbound → server sidecar inbound), and nginx 1.22 as
// an L7 reverse proxy (1 worker, upstream keep-alive) when it is installed.
// Compare ns/op between rows of one run: lower is more requests per second.
func BenchmarkHTTP1Parallel(b *testing.B) {
	be := benchBackend(b)
	run := func(b *testing.B, addr string) {
		c := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 64, DisableCompression: true}}
		b.ReportAllocs()
		b.SetParallelism(8) // 2 cores × 8 = 16 client goroutines
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				req, _ := http.NewRequest(http.MethodPost, "http://"+addr+"/", bytes.NewReader(payload))
				req.Host = "s"
				resp, err := c.Do(req)
				if err != nil {
					b.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
			}
		})
	}
	b.Run("direct", func(b *testing.B) { run(b, be.addr) })
	b.Run("l7-1hop", func(b *testing.B) {
		tp := startProxy(b, benchRoutedConfig(b, be.addr), "127.0.0.1:80", l4.Outbound)
		run(b, tp.addr)
	})
	b.Run("l7-2hops", func(b *testing.B) {
		server := startProxy(b, config.L7{}, be.addr, l4.Inbound)
		// The client sidecar's cluster endpoint is the server sidecar.
		client := startProxy(b, benchRoutedConfig(b, server.addr), "127.0.0.1:80", l4.Outbound)
		run(b, client.addr)
	})
	b.Run("nginx-1hop", func(b *testing.B) {
		addr, ok := startNginx(b, be.addr)
		if !ok {
			b.Skip("nginx not installed")
		}
		run(b, addr)
	})
}

// startNginx runs nginx as a 1-worker L7 reverse proxy with upstream
// keep-alive in front of backend; ok is false when nginx is not installed.
func startNginx(b *testing.B, backend string) (string, bool) {
	bin, err := exec.LookPath("nginx")
	if err != nil {
		return "", false
	}
	dir := b.TempDir()
	port := unusedAddr(b)
	conf := fmt.Sprintf(`worker_processes 1;
daemon off;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log warn;
events { worker_connections 1024; }
http {
  access_log off;
  client_body_temp_path %[1]s; proxy_temp_path %[1]s; fastcgi_temp_path %[1]s; uwsgi_temp_path %[1]s; scgi_temp_path %[1]s;
  upstream be { server %[2]s; keepalive 32; }
  server {
    listen %[3]s;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_set_header Host $host; }
  }
}
`, dir, backend, port)
	cf := filepath.Join(dir, "nginx.conf")
	if err := os.WriteFile(cf, []byte(conf), 0o644); err != nil {
		b.Fatal(err)
	}
	cmd := exec.Command(bin, "-p", dir, "-c", cf)
	cmd.Stderr = os.Stderr
	// Its own process group: killing only the master would orphan the
	// worker, which keeps the port (and any inherited lock fd) open.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL); cmd.Wait() })
	for i := 0; i < 100; i++ {
		if c, err := net.Dial("tcp", port); err == nil {
			c.Close()
			return port, true
		}
		time.Sleep(20 * time.Millisecond)
	}
	b.Fatal("nginx did not start")
	return "", false
}

// BenchmarkGRPCParallel measures unary gRPC throughput with 16 concurrent
// callers on 16 client connections (as fortio's grpc ping runs): direct, and
// through two L7 hops (client sidecar outbound → server sidecar inbound).
func BenchmarkGRPCParallel(b *testing.B) {
	_, addr, _ := startGRPC(b, "bench")
	run := func(b *testing.B, target string) {
		clients := make(chan testpb.TestServiceClient, 16)
		for range 16 {
			clients <- testpb.NewTestServiceClient(grpcConn(b, target, "s"))
		}
		req := &testpb.SimpleRequest{Payload: &testpb.Payload{Body: payload}}
		b.ReportAllocs()
		b.SetParallelism(8) // 2 cores × 8 = 16 callers
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			tc := <-clients
			for pb.Next() {
				if _, err := tc.UnaryCall(b.Context(), req); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	b.Run("direct", func(b *testing.B) { run(b, addr) })
	b.Run("l7-2hops", func(b *testing.B) {
		server := startProxy(b, config.L7{}, addr, l4.Inbound)
		client := startProxy(b, benchRoutedConfig(b, server.addr), "127.0.0.1:80", l4.Outbound)
		run(b, client.addr)
	})
}
