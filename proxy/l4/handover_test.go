package l4

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshlet/meshlet/internal/proctest"
)

// TestHandOverSessions: an L4 session (two sockets) and an HTTP/1.1 session
// (the client socket only, with the bytes of its next request) arrive
// intact, and the sockets still carry data; the sender's descriptors are
// closed once sent.
func TestHandOverSessions(t *testing.T) {
	t.Parallel()
	sendEnd, recvEnd := proctest.HandoverPair(t)
	rcv, err := NewReceiver(recvEnd)
	if err != nil {
		t.Fatal(err)
	}
	snd, err := NewSender(sendEnd, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !snd.HTTP1() {
		t.Fatal("a version 2 successor does not take HTTP/1.1 sessions")
	}
	dst := netip.MustParseAddrPort("10.0.0.1:8080")
	accepted := time.Unix(1700000000, 42)

	peer, client := tcpPair(t)
	upPeer, up := tcpPair(t)
	if err := snd.Send(&Session{Direction: Inbound, OrigDst: dst, Accepted: accepted, Client: client, Upstream: up,
		ToUpstream: []byte("to up"), ToClient: []byte("to client"), ClientDone: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := client.Write([]byte("x")); err == nil {
		t.Fatal("the sender's client descriptor is still open after the send")
	}
	l4s, err := rcv.Receive()
	if err != nil {
		t.Fatal(err)
	}
	if l4s.HTTP1 || l4s.Direction != Inbound || l4s.OrigDst != dst || !l4s.Accepted.Equal(accepted) || !l4s.ClientDone || l4s.UpstreamDone ||
		string(l4s.ToUpstream) != "to up" || string(l4s.ToClient) != "to client" || l4s.Upstream == nil {
		t.Fatalf("L4 session arrived as %+v", l4s)
	}
	checkCarries(t, peer, l4s.Client)
	checkCarries(t, upPeer, l4s.Upstream)
	l4s.Close()

	peer, client = tcpPair(t)
	if err := snd.Send(&Session{Direction: Outbound, OrigDst: dst, Accepted: accepted, Client: client, HTTP1: true,
		ToUpstream: []byte("GET / HT")}); err != nil {
		t.Fatal(err)
	}
	h1, err := rcv.Receive()
	if err != nil {
		t.Fatal(err)
	}
	if !h1.HTTP1 || h1.Direction != Outbound || h1.Upstream != nil || string(h1.ToUpstream) != "GET / HT" || h1.ToClient != nil {
		t.Fatalf("HTTP/1.1 session arrived as %+v", h1)
	}
	checkCarries(t, peer, h1.Client)
	h1.Close()

	snd.Close()
	if _, err := rcv.Receive(); !errors.Is(err, io.EOF) {
		t.Fatalf("after the sender closed: %v; want EOF", err)
	}
}

func checkCarries(t *testing.T, peer, moved *net.TCPConn) {
	t.Helper()
	_ = peer.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := peer.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(moved, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("moved socket read %q, %v", buf, err)
	}
}

// TestHandOverL4OnlySuccessor: a successor greeting with version 1 takes L4
// sessions only; an HTTP/1.1 session is refused before anything moves (the
// caller keeps the socket). Another greeting is a refusal.
func TestHandOverL4OnlySuccessor(t *testing.T) {
	t.Parallel()
	sendEnd, recvEnd := proctest.HandoverPair(t)
	if _, err := recvEnd.Write([]byte("meshlet-handover/1")); err != nil {
		t.Fatal(err)
	}
	snd, err := NewSender(sendEnd, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if snd.HTTP1() {
		t.Fatal("a version 1 successor is taken to accept HTTP/1.1 sessions")
	}
	peer, client := tcpPair(t)
	if err := snd.Send(&Session{Direction: Outbound, OrigDst: netip.MustParseAddrPort("10.0.0.1:80"), Client: client, HTTP1: true}); err == nil {
		t.Fatal("an HTTP/1.1 session was sent to a successor that takes L4 only")
	}
	checkCarries(t, peer, client) // still ours

	sendEnd, recvEnd = proctest.HandoverPair(t)
	if _, err := recvEnd.Write([]byte("meshlet-handover/9")); err != nil {
		t.Fatal(err)
	}
	if _, err := NewSender(sendEnd, time.Second); !errors.Is(err, ErrHandoverRefused) {
		t.Fatalf("unknown greeting: %v; want ErrHandoverRefused", err)
	}
}

// TestHandOverMalformedDescriptors: a message whose descriptor count does
// not match its kind is refused and its descriptors closed; the next
// message is fine.
func TestHandOverMalformedDescriptors(t *testing.T) {
	t.Parallel()
	sendEnd, recvEnd := proctest.HandoverPair(t)
	rcv, err := NewReceiver(recvEnd)
	if err != nil {
		t.Fatal(err)
	}
	snd, err := NewSender(sendEnd, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	// An HTTP/1.1 session message with two descriptors.
	peer, client := tcpPair(t)
	_, up := tcpPair(t)
	msg := make([]byte, handoverHeader)
	msg[0], msg[1], msg[2] = 1, byte(Outbound), flagHTTP1
	addr, _ := netip.MustParseAddrPort("10.0.0.1:80").MarshalBinary()
	msg[3] = byte(len(addr))
	msg = append(msg, addr...)
	err = withFD(client, func(cfd int) {
		_ = withFD(up, func(ufd int) {
			_, _, err = sendEnd.WriteMsgUnix(msg, unix.UnixRights(cfd, ufd), nil)
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	client.Close()
	up.Close()
	if _, err := rcv.Receive(); !errors.Is(err, ErrMalformedSession) {
		t.Fatalf("HTTP/1.1 message with two descriptors: %v; want ErrMalformedSession", err)
	}
	// Every copy of the client socket is closed: the peer reads EOF.
	_ = peer.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := peer.Read(make([]byte, 1)); !errors.Is(err, io.EOF) {
		t.Fatalf("peer of the refused session's socket: %v; want EOF (descriptor closed)", err)
	}
	peer, client = tcpPair(t)
	if err := snd.Send(&Session{Direction: Outbound, OrigDst: netip.MustParseAddrPort("10.0.0.1:80"), Client: client, HTTP1: true}); err != nil {
		t.Fatal(err)
	}
	s, err := rcv.Receive()
	if err != nil {
		t.Fatal(err)
	}
	checkCarries(t, peer, s.Client)
	s.Close()
}
