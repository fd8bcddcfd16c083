package l4

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Hand-over of established connections between generations.
//
// A draining generation moves each relayed connection to its successor
// instead of closing it: it interrupts both copies (a deadline in the past
// on both sockets, so no byte is read that is not accounted for), and sends
// one message per connection over a SOCK_SEQPACKET unix socket, the two
// sockets attached with SCM_RIGHTS. The message carries what the new
// generation needs to resume the copy: direction, original destination,
// accept time, which halves are already shut down, and the bytes that were
// read from one side and not yet written to the other. The successor greets
// with a version line first; a sender that reads another version refuses
// to hand over (the connections then stay where they are until they end or
// the drain deadline).
//
// An HTTP/1.1 connection the L7 engine serves moves the same way between
// two requests (Session.HTTP1): one socket, the client's, and the bytes of
// the next request read so far; the new generation's engine goes on
// serving it. Version 2 of the greeting says the successor takes such
// sessions; a version 1 successor takes L4 relays only.
//
// Ownership is never shared: the old generation closes its descriptors only
// after sendmsg(2) has put them in the message; from then on the kernel
// holds them for the receiving socket, and the new generation owns them once
// it has read the message. A failed send leaves them with the old
// generation, which resumes the copy itself.

// handoverHello is the first message the receiving generation sends;
// handoverHelloL4 is the one of a successor that takes L4 relays only.
const (
	handoverHello   = "meshlet-handover/2"
	handoverHelloL4 = "meshlet-handover/1"
)

// handoverHeader is the fixed part of a session message: version,
// direction, flags, original destination length, accept time (Unix ns), the
// two carried lengths.
const handoverHeader = 1 + 1 + 1 + 1 + 8 + 4 + 4

// maxHandoverMessage bounds a session message: header, an address and two
// carries (at most a pooled buffer or a pipe's worth each).
const maxHandoverMessage = handoverHeader + 32 + 2*max(copyBufSize, maxSplice)

const (
	flagClientDone = 1 << iota
	flagUpstreamDone
	flagHTTP1
)

// Session is one relayed connection, stopped, with everything needed to
// resume it in another process.
type Session struct {
	// Direction and OrigDst are the connection's capture direction and
	// original destination.
	Direction Direction
	OrigDst   netip.AddrPort
	// Accepted is when the first generation accepted it.
	Accepted time.Time
	// Client is the downstream connection, Upstream the connection to the
	// original destination.
	Client, Upstream *net.TCPConn
	// ToUpstream holds bytes read from the client and not yet written
	// upstream; ToClient the reverse.
	ToUpstream, ToClient []byte
	// ClientDone: the client's EOF has been passed on (the upstream's write
	// side is shut down); UpstreamDone: the same the other way.
	ClientDone, UpstreamDone bool
	// HTTP1 marks an HTTP/1.1 connection of the L7 engine moved between two
	// requests: Upstream is nil, and ToUpstream holds the bytes of the next
	// request read so far (the new generation parses them first).
	HTTP1 bool
}

// Close closes both sockets (this process's descriptors only).
func (s *Session) Close() {
	if s.Client != nil {
		_ = s.Client.Close()
	}
	if s.Upstream != nil {
		_ = s.Upstream.Close()
	}
}

// ErrHandoverRefused is returned by NewSender when the successor does not
// speak this hand-over protocol.
var ErrHandoverRefused = errors.New("hand-over refused")

// Sender hands sessions to the next generation. It is safe for concurrent
// use.
type Sender struct {
	c     *net.UnixConn
	mu    sync.Mutex
	http1 bool // the successor takes HTTP1 sessions
}

// HTTP1 reports whether the successor takes HTTP/1.1 sessions
// (Session.HTTP1).
func (snd *Sender) HTTP1() bool { return snd.http1 }

// NewSender reads the successor's greeting on c (waiting at most timeout)
// and returns a Sender, or ErrHandoverRefused (wrapped) if the successor
// speaks another version or says nothing. c is closed on error.
func NewSender(c *net.UnixConn, timeout time.Duration) (*Sender, error) {
	buf := make([]byte, 64)
	_ = c.SetReadDeadline(time.Now().Add(timeout))
	n, err := c.Read(buf)
	_ = c.SetReadDeadline(time.Time{})
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("%w: reading the successor's greeting: %w", ErrHandoverRefused, err)
	}
	got := string(buf[:n])
	if got != handoverHello && got != handoverHelloL4 {
		c.Close()
		return nil, fmt.Errorf("%w: successor speaks %q, want %q", ErrHandoverRefused, got, handoverHello)
	}
	return &Sender{c: c, http1: got == handoverHello}, nil
}

// Send moves s to the next generation. On success the two sockets are in
// the message and this process's descriptors are closed; on error nothing
// has moved and the caller still owns them.
func (snd *Sender) Send(s *Session) error {
	if s.HTTP1 && !snd.http1 {
		return errors.New("the successor does not take HTTP/1.1 connections")
	}
	if s.HTTP1 != (s.Upstream == nil) {
		return fmt.Errorf("session to %s: HTTP1 is %v with an upstream socket %v", s.OrigDst, s.HTTP1, s.Upstream != nil)
	}
	addr, err := s.OrigDst.MarshalBinary()
	if err != nil {
		return fmt.Errorf("encoding original destination %s: %w", s.OrigDst, err)
	}
	msg := make([]byte, handoverHeader, handoverHeader+len(addr)+len(s.ToUpstream)+len(s.ToClient))
	msg[0] = 1
	msg[1] = byte(s.Direction)
	if s.ClientDone {
		msg[2] |= flagClientDone
	}
	if s.UpstreamDone {
		msg[2] |= flagUpstreamDone
	}
	if s.HTTP1 {
		msg[2] |= flagHTTP1
	}
	msg[3] = byte(len(addr))
	binary.BigEndian.PutUint64(msg[4:], uint64(s.Accepted.UnixNano()))
	binary.BigEndian.PutUint32(msg[12:], uint32(len(s.ToUpstream)))
	binary.BigEndian.PutUint32(msg[16:], uint32(len(s.ToClient)))
	msg = append(append(append(msg, addr...), s.ToUpstream...), s.ToClient...)
	if len(msg) > maxHandoverMessage {
		return fmt.Errorf("hand-over message of %d bytes exceeds %d", len(msg), maxHandoverMessage)
	}
	var serr error
	send := func(fds ...int) {
		snd.mu.Lock()
		defer snd.mu.Unlock()
		_, _, serr = snd.c.WriteMsgUnix(msg, unix.UnixRights(fds...), nil)
	}
	err = withFD(s.Client, func(cfd int) {
		if s.HTTP1 {
			send(cfd)
			return
		}
		serr = withFD(s.Upstream, func(ufd int) { send(cfd, ufd) })
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("sending connection to %s: %w", s.OrigDst, err)
	}
	s.Close()
	return nil
}

// Close tells the successor that nothing more comes.
func (snd *Sender) Close() error { return snd.c.Close() }

func withFD(c *net.TCPConn, f func(fd int)) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	return rc.Control(func(fd uintptr) { f(int(fd)) })
}

// Receiver takes sessions from the previous generation.
type Receiver struct {
	c        *net.UnixConn
	buf, oob []byte
}

// NewReceiver greets the previous generation on c (the greeting waits in
// the socket until a sender reads it).
func NewReceiver(c *net.UnixConn) (*Receiver, error) {
	if _, err := c.Write([]byte(handoverHello)); err != nil {
		return nil, fmt.Errorf("greeting on the hand-over socket: %w", err)
	}
	return &Receiver{c: c, buf: make([]byte, maxHandoverMessage+1), oob: make([]byte, unix.CmsgSpace(2*4))}, nil
}

// ErrMalformedSession marks a session message Receive could not use (its
// descriptors are closed); the next message may be fine.
var ErrMalformedSession = errors.New("malformed hand-over message")

// Receive returns the next session; io.EOF once the sender is gone. A
// malformed message is an ErrMalformedSession, and its descriptors are
// closed.
func (r *Receiver) Receive() (*Session, error) {
	n, oobn, flags, _, err := r.c.ReadMsgUnix(r.buf, r.oob)
	if err != nil {
		return nil, fmt.Errorf("reading the hand-over socket: %w", err)
	}
	var fds []int
	if oobn > 0 {
		cms, err := unix.ParseSocketControlMessage(r.oob[:oobn])
		if err != nil {
			return nil, fmt.Errorf("hand-over control message: %w", err)
		}
		for _, cm := range cms {
			got, err := unix.ParseUnixRights(&cm)
			if err == nil {
				fds = append(fds, got...)
			}
		}
	}
	if n == 0 && oobn == 0 {
		return nil, io.EOF
	}
	s, err := decodeSession(r.buf[:n], flags, fds)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrMalformedSession, err)
	}
	return s, nil
}

// Close closes the receiving socket; sessions still queued in it are
// closed by the kernel.
func (r *Receiver) Close() error { return r.c.Close() }

// decodeSession owns fds: they end up in the session or closed.
func decodeSession(msg []byte, flags int, fds []int) (*Session, error) {
	s, err := parseSession(msg, flags, len(fds))
	if err != nil {
		for _, fd := range fds {
			_ = unix.Close(fd)
		}
		return nil, err
	}
	if s.Client, err = tcpFromFD(fds[0], "client"); err != nil {
		for _, fd := range fds[1:] {
			_ = unix.Close(fd)
		}
		return nil, err
	}
	if s.HTTP1 {
		return s, nil
	}
	if s.Upstream, err = tcpFromFD(fds[1], "upstream"); err != nil {
		s.Client.Close()
		return nil, err
	}
	return s, nil
}

func parseSession(msg []byte, flags, nfds int) (*Session, error) {
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		return nil, fmt.Errorf("hand-over message truncated (flags %#x)", flags)
	}
	if len(msg) < handoverHeader || msg[0] != 1 {
		return nil, fmt.Errorf("hand-over message: bad header (%d bytes)", len(msg))
	}
	want := 2
	if msg[2]&flagHTTP1 != 0 {
		want = 1
	}
	if nfds != want {
		return nil, fmt.Errorf("hand-over message carries %d descriptors, want %d", nfds, want)
	}
	alen := int(msg[3])
	up, down := int(binary.BigEndian.Uint32(msg[12:])), int(binary.BigEndian.Uint32(msg[16:]))
	if len(msg) != handoverHeader+alen+up+down {
		return nil, fmt.Errorf("hand-over message: %d bytes, header says %d", len(msg), handoverHeader+alen+up+down)
	}
	s := &Session{Direction: Direction(msg[1]), Accepted: time.Unix(0, int64(binary.BigEndian.Uint64(msg[4:]))),
		ClientDone: msg[2]&flagClientDone != 0, UpstreamDone: msg[2]&flagUpstreamDone != 0, HTTP1: msg[2]&flagHTTP1 != 0}
	if s.Direction != Inbound && s.Direction != Outbound {
		return nil, fmt.Errorf("hand-over message: unknown direction %d", msg[1])
	}
	body := msg[handoverHeader:]
	if err := s.OrigDst.UnmarshalBinary(body[:alen]); err != nil {
		return nil, fmt.Errorf("hand-over message: original destination: %w", err)
	}
	body = body[alen:]
	s.ToUpstream = clone(body[:up])
	s.ToClient = clone(body[up:])
	return s, nil
}

func clone(b []byte) []byte {
	if len(b) == 0 {
		return nil
	}
	return append([]byte(nil), b...)
}

// tcpFromFD takes ownership of fd (closed in every case) and returns it as
// a *net.TCPConn.
func tcpFromFD(fd int, name string) (*net.TCPConn, error) {
	f := os.NewFile(uintptr(fd), name)
	nc, err := net.FileConn(f)
	f.Close() // FileConn made its own copy
	if err != nil {
		return nil, fmt.Errorf("hand-over %s socket: %w", name, err)
	}
	tc, ok := nc.(*net.TCPConn)
	if !ok {
		nc.Close()
		return nil, fmt.Errorf("hand-over %s socket is not TCP", name)
	}
	return tc, nil
}
