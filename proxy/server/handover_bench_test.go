package server_test

import (
	"fmt"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// BenchmarkHandOver measures a hot restart of a generation holding n
// established, idle L4 connections: from the hand-over command until the
// old generation is gone and the new one has adopted every connection.
// Reported: ms per restart and µs per connection. Each connection is used
// once more afterwards to check it survived.
func BenchmarkHandOver(b *testing.B) {
	// Client, two proxy sides and backend live in this process: four
	// descriptors per connection, so the descriptor limit bounds n.
	var lim syscall.Rlimit
	_ = syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim)
	for _, n := range []int{1, 100, 1000, 3000} {
		b.Run(fmt.Sprintf("conns=%d", n), func(b *testing.B) {
			if need := uint64(4*n + 200); need > lim.Cur {
				b.Skipf("needs %d descriptors, RLIMIT_NOFILE is %d", need, lim.Cur)
			}
			backend := backendListener(b)
			backend.serve(func(c *net.TCPConn) { _, _ = io.Copy(c, c) })
			var total time.Duration
			for range b.N {
				b.StopTimer()
				g := startGenerations(b, 30*time.Second)
				conns := make([]*net.TCPConn, n)
				buf := make([]byte, 1)
				for i := range conns {
					conns[i] = g.connect(b, backend)
					if _, err := conns[i].Write([]byte("x")); err != nil {
						b.Fatal(err)
					}
					if _, err := io.ReadFull(conns[i], buf); err != nil {
						b.Fatal(err)
					}
				}
				adopted := `meshlet_proxy_adopted_connections_total{direction="outbound"}`
				before := g.counter(adopted)
				b.StartTimer()
				t0 := time.Now()
				g.restart(b)
				for g.counter(adopted)-before < uint64(n) {
					time.Sleep(100 * time.Microsecond)
				}
				total += time.Since(t0)
				b.StopTimer()
				for i, c := range conns {
					if _, err := c.Write([]byte("y")); err != nil {
						b.Fatalf("connection %d after the hand-over: %v", i, err)
					}
					if _, err := io.ReadFull(c, buf); err != nil || buf[0] != 'y' {
						b.Fatalf("connection %d after the hand-over: %q, %v", i, buf, err)
					}
					c.Close()
				}
				g.next.Close()
			}
			b.ReportMetric(float64(total.Milliseconds())/float64(b.N), "ms/restart")
			b.ReportMetric(float64(total.Microseconds())/float64(b.N*n), "µs/conn")
		})
	}
}
