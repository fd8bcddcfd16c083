package l7

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"syscall"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
)

// BenchmarkUpstreamTLS: one proxy hop to an HTTP/1.1 upstream, plain text
// and TLS (SIMPLE), one request at a time over keep-alive connections (so
// the handshake is amortised: this is the cost of encrypting and
// decrypting 1 KiB each way), 1 KiB bodies as in BenchmarkHTTP1.
func BenchmarkUpstreamTLS(b *testing.B) {
	ca := newTestCA(b, "ca")
	h := func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Write(payload)
	}
	plain := startBackend(b, "bench", h)
	secure := startTLSBackend(b, "bench", ca.issue(b, "server", false, "127.0.0.1"), nil, h)
	config := func(addr, tlsYAML string) config.L7 {
		return mustLoad(b, fmt.Sprintf(`
services:
- name: s
  hosts: [s]
  routes: [{name: r, destinations: [{cluster: c}]}]
clusters:
- name: c
  protocol: http1
  endpoints: [{address: %q}]
%s`, addr, tlsYAML))
	}
	b.Run("plain", func(b *testing.B) {
		tp := startProxy(b, config(plain.addr, ""), "127.0.0.1:80", l4.Outbound)
		defer reportCPU(b)()
		runHTTP(b, h1Client(), "http://"+tp.addr+"/", "s")
	})
	b.Run("tls", func(b *testing.B) {
		tp := startProxy(b, config(secure.addr, fmt.Sprintf("  tls: {mode: SIMPLE, caCertificates: %q}\n", ca.pem)), "127.0.0.1:80", l4.Outbound)
		before := secure.conns.Load()
		defer reportCPU(b)()
		runHTTP(b, h1Client(), "http://"+tp.addr+"/", "s")
		if n := secure.conns.Load() - before; n > 1 {
			b.Fatalf("%d upstream TLS connections: keep-alive not in use", n)
		}
	})
}

// reportCPU adds the process's CPU time (user+sys) per op to a benchmark:
// client, proxy and backend all run in the test process, so this counts
// the upstream TLS server's work too. On a loaded two-core machine it is
// steadier than ns/op.
func reportCPU(b *testing.B) func() {
	cpu := func() time.Duration {
		var ru syscall.Rusage
		_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	start := cpu()
	return func() { b.ReportMetric(float64(cpu()-start)/float64(b.N), "cpu-ns/op") }
}

// BenchmarkUpstreamTLSHandshake: the cost of one new upstream connection
// (client and server side, both on this machine): TCP only, a full TLS 1.3
// handshake (ECDSA P-256 certificate, verified), and a resumed one (the
// cluster's session cache; TLS 1.3 PSK with a fresh key exchange).
func BenchmarkUpstreamTLSHandshake(b *testing.B) {
	ca := newTestCA(b, "ca")
	cert := ca.issue(b, "server", false, "127.0.0.1")
	full := startTLSBackend(b, "full", cert, func(c *tls.Config) { c.SessionTicketsDisabled = true })
	resumed := startTLSBackend(b, "resumed", cert, nil)
	cl := config.Cluster{Name: "c", Endpoints: []config.Endpoint{{Address: "127.0.0.1:1"}}, TLS: &config.UpstreamTLS{Mode: config.TLSSimple, CACertificates: ca.pem}}
	ut, errs := upstream.NewTLS(&cl, "tls", nil, nil)
	if len(errs) > 0 {
		b.Fatal(errs)
	}
	d := &net.Dialer{}
	tcp := func(ctx context.Context, network, addr string) (net.Conn, error) {
		return d.DialContext(ctx, network, addr)
	}
	run := func(b *testing.B, addr string, dial func(ctx context.Context, network, addr string) (net.Conn, error), resume bool) {
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			c, err := dial(b.Context(), "tcp", addr)
			if err != nil {
				b.Fatal(err)
			}
			if tc, ok := c.(*tls.Conn); ok && tc.ConnectionState().DidResume != resume {
				b.Fatalf("resumed %v, want %v", !resume, resume)
			}
			c.Close()
		}
	}
	b.Run("tcp", func(b *testing.B) { run(b, full.addr, tcp, false) })
	b.Run("full", func(b *testing.B) { run(b, full.addr, ut.DialHTTP1(tcp, 10*time.Second), false) })
	b.Run("resumed", func(b *testing.B) {
		dial := ut.DialHTTP1(tcp, 10*time.Second)
		// Let the first connection's ticket arrive so the next ones resume.
		c, err := dial(b.Context(), "tcp", resumed.addr)
		if err != nil {
			b.Fatal(err)
		}
		c.SetReadDeadline(time.Now().Add(50 * time.Millisecond))
		c.Read(make([]byte, 1))
		c.Close()
		b.ResetTimer()
		run(b, resumed.addr, dial, true)
	})
}
