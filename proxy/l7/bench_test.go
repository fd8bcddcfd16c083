package l7

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"testing"

	testpb "google.golang.org/grpc/interop/grpc_testing"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
)

// The benchmarks measure one request at a time over a keep-alive connection
// with a 1 KiB body each way (as in docs/design.md §8): directly to the backend,
// and through the engine (passthrough, and an L7-routed service with a
// header match, weighted split, retry policy and outlier detection).
// allocs/op count the client and backend too: compare the rows.

var payload = bytes.Repeat([]byte("x"), 1024)

func benchBackend(b *testing.B) *backend {
	return startBackend(b, "bench", func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Write(payload)
	})
}

func benchRoutedConfig(b *testing.B, addr string) config.L7 {
	return mustLoad(b, fmt.Sprintf(`
services:
- name: s
  hosts: [s]
  routes:
  - name: canary
    match: [{headers: {x-canary: {exact: "1"}}}]
    destinations: [{cluster: c}]
  - name: main
    match: [{uri: {prefix: /}}]
    retries: {attempts: 2, retryOn: [5xx]}
    destinations: [{cluster: c, weight: 90}, {cluster: c, weight: 10}]
clusters:
- name: c
  loadBalancer: peak_ewma
  endpoints: [{address: %q}]
  outlierDetection: {consecutive5xx: 5}
`, addr))
}

func runHTTP(b *testing.B, c *http.Client, url, host string) {
	b.ReportAllocs()
	b.SetBytes(2 * int64(len(payload)))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		req, _ := http.NewRequest(http.MethodPost, url, bytes.NewReader(payload))
		req.Host = host
		resp, err := c.Do(req)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != 200 {
			b.Fatalf("status %d", resp.StatusCode)
		}
	}
}

func BenchmarkHTTP1(b *testing.B) {
	be := benchBackend(b)
	b.Run("direct", func(b *testing.B) { runHTTP(b, h1Client(), "http://"+be.addr+"/", "s") })
	b.Run("passthrough", func(b *testing.B) {
		tp := startProxy(b, config.L7{}, be.addr, l4.Outbound)
		runHTTP(b, h1Client(), "http://"+tp.addr+"/", "s")
	})
	b.Run("routed", func(b *testing.B) {
		tp := startProxy(b, benchRoutedConfig(b, be.addr), "127.0.0.1:80", l4.Outbound)
		runHTTP(b, h1Client(), "http://"+tp.addr+"/", "s")
	})
	b.Run("routed+accesslog", func(b *testing.B) {
		cfg := benchRoutedConfig(b, be.addr)
		cfg.AccessLog.Enabled = true
		tp := startProxy(b, cfg, "127.0.0.1:80", l4.Outbound, func(o *Options) { o.AccessLog = io.Discard })
		runHTTP(b, h1Client(), "http://"+tp.addr+"/", "s")
	})
}

func BenchmarkH2C(b *testing.B) {
	be := benchBackend(b)
	b.Run("direct", func(b *testing.B) { runHTTP(b, h2cClient(), "http://"+be.addr+"/", "s") })
	b.Run("routed", func(b *testing.B) {
		tp := startProxy(b, benchRoutedConfig(b, be.addr), "127.0.0.1:80", l4.Outbound)
		runHTTP(b, h2cClient(), "http://"+tp.addr+"/", "s")
	})
}

func BenchmarkGRPCUnary(b *testing.B) {
	_, addr, _ := startGRPC(b, "bench")
	run := func(b *testing.B, target, authority string) {
		tc := testpb.NewTestServiceClient(grpcConn(b, target, authority))
		req := &testpb.SimpleRequest{Payload: &testpb.Payload{Body: payload}}
		ctx := b.Context()
		b.ReportAllocs()
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			if _, err := tc.UnaryCall(ctx, req); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.Run("direct", func(b *testing.B) { run(b, addr, "s") })
	b.Run("routed", func(b *testing.B) {
		tp := startProxy(b, benchRoutedConfig(b, addr), "127.0.0.1:80", l4.Outbound)
		run(b, tp.addr, "s")
	})
}
