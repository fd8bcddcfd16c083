package l4_test

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshlet/meshlet/internal/proctest"
)

const (
	activeOut   = `meshlet_proxy_active_connections{direction="outbound"}`
	errOrigDst  = `meshlet_proxy_errors_total{direction="any",kind="original_destination"}`
	errAccept   = `meshlet_proxy_errors_total{direction="any",kind="accept"}`
	errOverflow = `meshlet_proxy_errors_total{direction="outbound",kind="overflow"}`
)

// TestGarbageNotRedirected: random bytes sent straight to 15001 and 15006
// (no redirect, so no original destination) are closed by the proxy and
// counted; it keeps serving its admin endpoint and its memory stays bounded.
func TestGarbageNotRedirected(t *testing.T) {
	p := startProxy(t, "", "")
	const perListener = 50
	var wg sync.WaitGroup
	errs := make(chan error, 2*perListener)
	for _, addr := range []string{p.outbound, p.inbound} {
		for i := 0; i < perListener; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := net.Dial("tcp", addr)
				if errors.Is(err, syscall.ECONNRESET) {
					return // reset before connect(2) returned: closed all the same
				}
				if err != nil {
					errs <- err
					return
				}
				defer c.Close()
				garbage := make([]byte, 64<<10)
				_, _ = rand.Read(garbage)
				_, _ = c.Write(garbage) // may fail: the proxy resets
				if err := closedByPeer(c, 10*time.Second); err != nil {
					errs <- fmt.Errorf("%s: %w", addr, err)
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	p.waitMetric(t, errOrigDst, func(v float64) bool { return v >= 2*perListener })
	if v := p.metric(t, errOrigDst); v != 2*perListener {
		t.Errorf("%s = %v, want %d", errOrigDst, v, 2*perListener)
	}
	p.waitMetric(t, activeOut, func(v float64) bool { return v == 0 })
	if code, body := proctest.HTTPGet("http://" + p.admin + "/server_info"); code != 200 {
		t.Errorf("admin after garbage: %d %s", code, body)
	}
	p.mustRun(t)
	rss := p.rssKB(t)
	t.Logf("proxy RSS %d kB (at start %d kB)", rss, p.baseRSS)
	if rss-p.baseRSS > 32<<10 {
		t.Errorf("proxy RSS grew from %d kB to %d kB", p.baseRSS, rss)
	}
}

// TestHalfOpen: a half-closed connection keeps carrying data the other way
// through the proxy, in both directions, and both sides close at the end.
func TestHalfOpen(t *testing.T) {
	b := newBackend(t)
	p := startProxy(t, b.addr, "")
	const size = 4 << 20
	const conns = 10

	t.Run("client FIN, server keeps sending", func(t *testing.T) {
		var wg sync.WaitGroup
		for i := 0; i < conns; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := net.Dial("tcp", p.outbound)
				if err != nil {
					t.Error(err)
					return
				}
				defer c.Close()
				if _, err := fmt.Fprintf(c, "PUSH %d\n", size); err != nil {
					t.Error(err)
					return
				}
				_ = c.(*net.TCPConn).CloseWrite()
				_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
				n, err := io.Copy(io.Discard, c)
				if err != nil || n != size {
					t.Errorf("after the client's FIN: read %d of %d bytes: %v", n, size, err)
				}
			}()
		}
		wg.Wait()
	})

	t.Run("server FIN, client keeps sending", func(t *testing.T) {
		var wg sync.WaitGroup
		for i := 0; i < conns; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := net.Dial("tcp", p.outbound)
				if err != nil {
					t.Error(err)
					return
				}
				defer c.Close()
				if _, err := io.WriteString(c, "SINK\n"); err != nil {
					t.Error(err)
					return
				}
				// The server's FIN arrives first...
				_ = c.SetReadDeadline(time.Now().Add(30 * time.Second))
				if n, err := io.Copy(io.Discard, c); err != nil || n != 0 {
					t.Errorf("waiting for the server's FIN: %d bytes, %v", n, err)
					return
				}
				// ...and the client's bytes still reach it.
				if _, err := c.Write(bytes.Repeat([]byte("s"), size)); err != nil {
					t.Errorf("writing after the server's FIN: %v", err)
					return
				}
				_ = c.(*net.TCPConn).CloseWrite()
			}()
		}
		wg.Wait()
		for i := 0; i < conns; i++ {
			select {
			case n := <-b.sunk:
				if n != size {
					t.Errorf("server received %d of %d bytes after its FIN", n, size)
				}
			case <-time.After(30 * time.Second):
				t.Fatal("server never saw the client's FIN")
			}
		}
	})
	// Both sides closed: the proxy holds nothing.
	p.waitMetric(t, activeOut, func(v float64) bool { return v == 0 })
	p.assertBounded(t, 32)
}

// TestSlowClient: an upstream sending as fast as it can to a client that
// reads one byte a second is held back by TCP flow control through the
// proxy: the proxy buffers a bounded amount, not the whole stream.
func TestSlowClient(t *testing.T) {
	b := newBackend(t)
	p := startProxy(t, b.addr, "")
	const conns = 4
	var cs []net.Conn
	for i := 0; i < conns; i++ {
		c, err := net.Dial("tcp", p.outbound)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := io.WriteString(c, "FLOOD\n"); err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
	}
	// Wait until the upstream is blocked: its byte count stops growing.
	stable := func() int64 {
		last, since := int64(-1), time.Now()
		for {
			n := b.floodedBytes()
			if n != last {
				last, since = n, time.Now()
			} else if n > 0 && time.Since(since) > 500*time.Millisecond {
				return n
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	// Kernel socket buffers on the way (upstream send, proxy receive and
	// send, client receive: a few MiB each at most) are all that may be
	// in flight; an unbounded proxy would take the whole stream.
	const bound = conns * 64 << 20
	n := stable()
	t.Logf("upstream blocked after %d bytes in flight for %d slow clients", n, conns)
	// The client reads one byte a second for three seconds.
	for i := 0; i < 3; i++ {
		for _, c := range cs {
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(time.Second)
	}
	if n := b.floodedBytes(); n > bound {
		t.Errorf("upstream wrote %d bytes to %d clients that read 3 bytes each (bound %d)", n, conns, bound)
	}
	p.mustRun(t)
	rss := p.rssKB(t)
	t.Logf("proxy RSS with %d slow clients: %d kB (at start %d kB)", conns, rss, p.baseRSS)
	if rss-p.baseRSS > 32<<10 {
		t.Errorf("proxy RSS grew from %d kB to %d kB with slow clients", p.baseRSS, rss)
	}
	// The clients go away: the upstream's writes fail, the proxy lets go.
	for _, c := range cs {
		c.Close()
	}
	for i := 0; i < conns; i++ {
		select {
		case <-b.sunk:
		case <-time.After(30 * time.Second):
			t.Fatal("upstream still writing after the slow client closed")
		}
	}
	p.waitMetric(t, activeOut, func(v float64) bool { return v == 0 })
	p.assertBounded(t, 32)
}

// TestSlowUpstream: a client sending as fast as it can to a destination
// that reads nothing is held back by flow control through the proxy too;
// when the destination gives up, the proxy lets go of both sides.
func TestSlowUpstream(t *testing.T) {
	b := newBackend(t)
	p := startProxy(t, b.addr, "")
	c, err := net.Dial("tcp", p.outbound)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "STALL\n"); err != nil {
		t.Fatal(err)
	}
	select {
	case <-b.stalls:
	case <-time.After(20 * time.Second):
		t.Fatal("the stalling destination never got the connection")
	}
	var mu sync.Mutex
	var sent int64
	writerDone := make(chan error, 1)
	go func() {
		chunk := bytes.Repeat([]byte("w"), 64<<10)
		for {
			n, err := c.Write(chunk)
			mu.Lock()
			sent += int64(n)
			mu.Unlock()
			if err != nil {
				writerDone <- err
				return
			}
		}
	}()
	last, since := int64(-1), time.Now()
	for {
		mu.Lock()
		n := sent
		mu.Unlock()
		if n != last {
			last, since = n, time.Now()
		} else if n > 0 && time.Since(since) > 500*time.Millisecond {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Logf("client blocked after %d bytes in flight to a destination that reads nothing", last)
	if last > 64<<20 {
		t.Errorf("client wrote %d bytes to a destination that reads nothing (bound %d)", last, 64<<20)
	}
	rss := p.rssKB(t)
	t.Logf("proxy RSS with a stalled destination: %d kB (at start %d kB)", rss, p.baseRSS)
	if rss-p.baseRSS > 32<<10 {
		t.Errorf("proxy RSS grew from %d kB to %d kB with a stalled destination", p.baseRSS, rss)
	}
	close(b.release) // the destination closes with unread data: a reset
	select {
	case <-writerDone:
	case <-time.After(30 * time.Second):
		t.Fatal("client still writing after the destination closed")
	}
	p.waitMetric(t, activeOut, func(v float64) bool { return v == 0 })
	p.assertBounded(t, 32)
}

// TestFDExhaustion: connections are held open through the proxy, then its
// RLIMIT_NOFILE is lowered (prlimit) to exactly the descriptors it has, so
// every accept fails with EMFILE while more connections wait in the
// backlog. The proxy neither exits nor spins (its CPU time over two seconds
// out of descriptors stays far below a core), logs and counts the failure,
// and once the held connections close it serves the queued connections and
// new ones normally.
func TestFDExhaustion(t *testing.T) {
	b := newBackend(t)
	p := startProxy(t, b.addr, "")
	pid := p.cmd.Process.Pid
	const holdN, queuedN = 8, 4
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	held = dialHolding(t, p.outbound, holdN)
	p.waitMetric(t, activeOut, func(v float64) bool { return v == holdN })
	// The kernel hands out the lowest free descriptor number, and only
	// numbers below the limit: a limit of the lowest free number leaves
	// none.
	lowest := 0
	for ; ; lowest++ {
		if _, err := os.Lstat(fmt.Sprintf("/proc/%d/fd/%d", pid, lowest)); err != nil {
			break
		}
	}
	lim := unix.Rlimit{Cur: uint64(lowest), Max: uint64(lowest)}
	if err := unix.Prlimit(pid, unix.RLIMIT_NOFILE, &lim, nil); err != nil {
		t.Fatalf("prlimit: %v", err)
	}
	t.Logf("RLIMIT_NOFILE of the proxy lowered to %d (its lowest free descriptor)", lowest)
	// These wait in the backlog: accept has no descriptor to give them.
	var queued []net.Conn
	for i := 0; i < queuedN; i++ {
		c, err := net.Dial("tcp", p.outbound)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"); err != nil {
			t.Fatal(err)
		}
		queued = append(queued, c)
	}
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(p.out.String(), "too many open files") {
		if time.Now().After(deadline) {
			t.Fatal("accept never failed with EMFILE")
		}
		time.Sleep(20 * time.Millisecond)
	}
	t0, c0 := time.Now(), cpuTicks(t, pid)
	time.Sleep(2 * time.Second)
	ticks, wall := cpuTicks(t, pid)-c0, time.Since(t0)
	t.Logf("CPU while out of descriptors: %d ticks (1/100 s) in %s", ticks, wall.Round(time.Millisecond))
	// 100 ticks a second is one core; an accept loop retrying EMFILE
	// without a pause takes that.
	if limit := int(wall.Seconds() * 100 / 4); ticks > limit {
		t.Errorf("proxy used %d CPU ticks in %s while out of descriptors (spinning?), bound %d", ticks, wall, limit)
	}
	p.mustRun(t)
	if n := strings.Count(p.out.String(), "accept failed"); n > 100 {
		t.Errorf("%d accept-failure log lines in %s: the log is flooded", n, wall)
	}
	for _, c := range held {
		c.Close()
	}
	held = nil
	// The queued connections are served once descriptors free up.
	for i, c := range queued {
		_ = c.SetReadDeadline(time.Now().Add(20 * time.Second))
		resp, err := io.ReadAll(c)
		if err != nil || !bytes.HasPrefix(resp, []byte("HTTP/1.1 200 OK")) || !bytes.HasSuffix(resp, bytes.Repeat([]byte("x"), 1024)) {
			t.Errorf("queued connection %d: %v: %.80q", i, err, resp)
		}
		c.Close()
	}
	if v := p.metric(t, errAccept); v < 1 {
		t.Errorf("%s = %v after EMFILE", errAccept, v)
	}
	p.waitMetric(t, activeOut, func(v float64) bool { return v == 0 })
	p.assertBounded(t, 32)
}

// TestConnectionFlood: beyond outbound.maxConnections new connections are
// closed at once and counted as overflow while the admitted ones keep
// working; afterwards the proxy serves normally and its memory is bounded.
func TestConnectionFlood(t *testing.T) {
	b := newBackend(t)
	const limit, flood = 20, 300
	p := startProxy(t, b.addr, fmt.Sprintf("apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\noutbound:\n  maxConnections: %d\n", limit))
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	held = dialHolding(t, p.outbound, limit)
	p.waitMetric(t, activeOut, func(v float64) bool { return v == limit })
	var wg sync.WaitGroup
	var mu sync.Mutex
	refused := 0
	for i := 0; i < flood; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			c, err := net.Dial("tcp", p.outbound)
			if err != nil && !errors.Is(err, syscall.ECONNRESET) {
				t.Error(err)
				return
			}
			if err == nil { // else reset before connect(2) returned
				defer c.Close()
				_, _ = io.WriteString(c, "HOLD\n")
				if err := closedByPeer(c, 10*time.Second); err != nil {
					t.Error(err)
					return
				}
			}
			mu.Lock()
			refused++
			mu.Unlock()
		}()
	}
	wg.Wait()
	if refused != flood {
		t.Errorf("%d of %d connections beyond the limit were closed", refused, flood)
	}
	if v := p.metric(t, errOverflow); v != flood {
		t.Errorf("%s = %v, want %d", errOverflow, v, flood)
	}
	// The admitted connections still work.
	for _, c := range held {
		if _, err := io.WriteString(c, "still here\n"); err != nil {
			t.Errorf("admitted connection broken by the flood: %v", err)
		}
	}
	for _, c := range held {
		c.Close()
	}
	held = nil
	p.waitMetric(t, activeOut, func(v float64) bool { return v == 0 })
	p.assertBounded(t, 32)
}

// dialHolding opens n connections through the proxy at addr to the
// backend's HOLD command, which keeps each open until the client closes it
// (at the latest when the test ends).
func dialHolding(t *testing.T, addr string, n int) []net.Conn {
	t.Helper()
	var cs []net.Conn
	t.Cleanup(func() {
		for _, c := range cs {
			c.Close()
		}
	})
	for i := 0; i < n; i++ {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		cs = append(cs, c)
		if _, err := io.WriteString(c, "HOLD\n"); err != nil {
			t.Fatal(err)
		}
	}
	return cs
}
