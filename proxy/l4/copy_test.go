package l4

import (
	"bytes"
	"crypto/rand"
	"crypto/sha256"
	"errors"
	"io"
	"net"
	"syscall"
	"testing"
	"time"
)

// tcpPair returns the two ends of a loopback TCP connection.
func tcpPair(t testing.TB) (a, b *net.TCPConn) {
	t.Helper()
	ln, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan *net.TCPConn, 1)
	go func() {
		c, err := ln.AcceptTCP()
		if err != nil {
			accepted <- nil
			return
		}
		accepted <- c
	}()
	a, err = net.DialTCP("tcp", nil, ln.Addr().(*net.TCPAddr))
	if err != nil {
		t.Fatal(err)
	}
	b = <-accepted
	if b == nil {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// relayPair wires client ⇄ [copyConn both ways] ⇄ server and returns the
// outer ends plus the results of the two copies.
type relayed struct {
	client, server *net.TCPConn
	up, down       chan copyResult
}

type copyResult struct {
	n   int64
	err error
}

func newRelay(t testing.TB) *relayed {
	client, pin := tcpPair(t)
	pout, server := tcpPair(t)
	r := &relayed{client: client, server: server, up: make(chan copyResult, 1), down: make(chan copyResult, 1)}
	go func() {
		n, err := copyConn(pout, pin)
		if err == nil {
			_ = pout.CloseWrite()
		}
		r.up <- copyResult{n, err}
	}()
	go func() {
		n, err := copyConn(pin, pout)
		if err == nil {
			_ = pin.CloseWrite()
		}
		r.down <- copyResult{n, err}
	}()
	return r
}

func TestCopyConnRequestResponse(t *testing.T) {
	bulk := bulkStreams.Load()
	r := newRelay(t)
	req := bytes.Repeat([]byte("q"), 1024)
	resp := bytes.Repeat([]byte("r"), 1024)
	buf := make([]byte, 1024)
	for i := range 200 {
		if _, err := r.client.Write(req); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(r.server, buf); err != nil || !bytes.Equal(buf, req) {
			t.Fatalf("request %d: %v, %q…", i, err, buf[:8])
		}
		if _, err := r.server.Write(resp); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(r.client, buf); err != nil || !bytes.Equal(buf, resp) {
			t.Fatalf("response %d: %v, %q…", i, err, buf[:8])
		}
	}
	// Between requests no buffer is held: idle connections cost no memory.
	waitFor(t, "idle relay to return its buffers", func() bool { return buffersInUse.Load() == 0 })

	// Half-close: the client's FIN reaches the server, the server can still
	// answer, then its FIN ends the other direction.
	if err := r.client.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if n, err := r.server.Read(buf); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("server read after client FIN = %d, %v; want EOF", n, err)
	}
	if _, err := r.server.Write([]byte("late")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(r.client, buf[:4]); err != nil || string(buf[:4]) != "late" {
		t.Fatalf("answer after half-close: %q, %v", buf[:4], err)
	}
	_ = r.server.CloseWrite()
	up, down := <-r.up, <-r.down
	if up.err != nil || down.err != nil {
		t.Fatalf("copies ended with %v / %v, want nil (EOF)", up.err, down.err)
	}
	if up.n != 200*1024 || down.n != 200*1024+4 {
		t.Fatalf("copied %d up / %d down, want %d / %d", up.n, down.n, 200*1024, 200*1024+4)
	}
	if got := buffersInUse.Load(); got != 0 {
		t.Fatalf("%d buffers still in use after both copies ended", got)
	}
	if got := bulkStreams.Load() - bulk; got != 0 {
		t.Fatalf("1 KiB messages switched %d directions to splice", got)
	}
}

func TestCopyConnBulkSwitchesToSplice(t *testing.T) {
	before := bulkStreams.Load()
	r := newRelay(t)
	data := make([]byte, 8<<20+123)
	if _, err := rand.Read(data); err != nil {
		t.Fatal(err)
	}
	go func() {
		_, _ = r.client.Write(data)
		_ = r.client.CloseWrite()
	}()
	h := sha256.New()
	n, err := io.Copy(h, r.server)
	if err != nil || n != int64(len(data)) {
		t.Fatalf("server received %d bytes (%v), want %d", n, err, len(data))
	}
	if want := sha256.Sum256(data); !bytes.Equal(h.Sum(nil), want[:]) {
		t.Fatal("bulk stream corrupted in transit")
	}
	if up := <-r.up; up.err != nil || up.n != int64(len(data)) {
		t.Fatalf("copy up = %d, %v", up.n, up.err)
	}
	if got := bulkStreams.Load() - before; got != 1 {
		t.Fatalf("%d directions switched to splice, want 1 (the bulk upload)", got)
	}
}

func TestCopyConnPassesReset(t *testing.T) {
	r := newRelay(t)
	if _, err := r.server.Write([]byte("x")); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(r.client, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	_ = r.server.SetLinger(0)
	_ = r.server.Close() // RST
	down := <-r.down
	if !errors.Is(down.err, syscall.ECONNRESET) {
		t.Fatalf("copy from a reset connection ended with %v, want ECONNRESET", down.err)
	}
}

func TestCopyConnClosedSource(t *testing.T) {
	a, b := tcpPair(t)
	c, _ := tcpPair(t)
	done := make(chan error, 1)
	go func() { _, err := copyConn(c, b); done <- err }()
	time.Sleep(20 * time.Millisecond) // let it park in the poller
	_ = b.Close()
	if err := <-done; !errors.Is(err, net.ErrClosed) {
		t.Fatalf("copy from a closed socket ended with %v, want net.ErrClosed", err)
	}
	_ = a
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// BenchmarkRelay1KiB is one 1 KiB request and 1 KiB response through a
// relay: copyConn against io.Copy (splice) as the baseline, same run.
func BenchmarkRelay1KiB(b *testing.B) {
	for _, tc := range []struct {
		name string
		copy func(dst, src *net.TCPConn) (int64, error)
	}{
		{"copyConn", copyConn},
		{"io.Copy-splice", func(dst, src *net.TCPConn) (int64, error) { return io.Copy(dst, src) }},
	} {
		b.Run(tc.name, func(b *testing.B) {
			client, pin := tcpPair(b)
			pout, server := tcpPair(b)
			go func() { _, _ = tc.copy(pout, pin) }()
			go func() { _, _ = tc.copy(pin, pout) }()
			go func() {
				buf := make([]byte, 1024)
				for {
					if _, err := io.ReadFull(server, buf); err != nil {
						return
					}
					if _, err := server.Write(buf); err != nil {
						return
					}
				}
			}()
			msg := make([]byte, 1024)
			buf := make([]byte, 1024)
			b.ReportAllocs()
			b.SetBytes(2048)
			b.ResetTimer()
			for range b.N {
				if _, err := client.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(client, buf); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
