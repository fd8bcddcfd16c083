package l4

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/stats"
)

// A client that resets while its upload is stuck behind a destination that
// reads nothing: neither copy can see the reset (one is blocked writing to
// the destination, the other reading from it), so the relay's periodic
// check must pass it on and release both sockets — not hold them until the
// idle timeout.
func TestRelayPassesResetWhileCopiesBlocked(t *testing.T) {
	dst, err := net.ListenTCP("tcp", &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	upstream := make(chan *net.TCPConn, 1)
	go func() {
		c, err := dst.AcceptTCP()
		if err == nil {
			upstream <- c // accepted, never read
		}
	}()

	region := stats.NewPrivate()
	m := NewMetrics(region, Outbound)
	f := &Forwarder{
		Metrics:       [2]*Metrics{m, m},
		Log:           slog.New(slog.NewTextHandler(io.Discard, nil)),
		CheckInterval: 50 * time.Millisecond,
	}
	client, proxySide := tcpPair(t)
	done := make(chan error, 1)
	go func() {
		c := NewConn(proxySide, Outbound, netip.MustParseAddrPort(dst.Addr().String()), nil)
		done <- f.Forward(context.Background(), c, nil)
	}()
	up := <-upstream
	defer up.Close()

	// Fill every buffer on the way: the proxy's write to the destination blocks.
	_ = client.SetWriteDeadline(time.Now().Add(2 * time.Second))
	chunk := make([]byte, 64<<10)
	var sent int
	for {
		n, err := client.Write(chunk)
		sent += n
		if err != nil {
			break
		}
	}
	if sent < 1<<20 {
		t.Fatalf("only %d bytes went out before the client blocked; the destination should be the one not reading", sent)
	}
	_ = client.SetLinger(0)
	_ = client.Close() // RST

	select {
	case <-done:
	case <-time.After(20 * time.Second):
		t.Fatal("relay still holds both sockets 20s after the client reset")
	}
	if got := m.Resets.Value(); got != 1 {
		t.Errorf("resets counted: %d, want 1", got)
	}
	// The destination sees the connection go away too.
	_ = up.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, up); err == nil {
		t.Log("destination saw a clean EOF")
	} else if ne := net.Error(nil); errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("destination connection still open after the relay returned")
	}
}
