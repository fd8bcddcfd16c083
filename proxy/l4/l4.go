// Package l4 is the proxy's transport layer: the connection handed to a
// handler, the handler seam, and the default handler — a transparent L4
// passthrough to the original destination.
//
// # The handler seam
//
// The generation server (package server) accepts a connection on the
// inbound (15006) or outbound (15001) listener, reads its original
// destination, wraps it in a *Conn and asks a Chooser for the Handler that
// serves it. The default Chooser returns the Forwarder (L4 passthrough). An
// L7 handler (HTTP/1.1, h2c, gRPC) plugs in by providing a Chooser that
// returns its own Handler for the ports/protocols it serves; it may sniff
// the first bytes and fall back to Forwarder.Forward with the bytes it has
// already read as prefix.
//
// Draining: when the generation starts draining, Conn.Draining() is closed.
// A handler stops taking new work at its next safe boundary (HTTP/1:
// between two requests it moves the connection to the next generation
// (Session.HTTP1), or without one answers the next request with
// `Connection: close`; HTTP/2: GOAWAY) and returns.
// The L4 passthrough instead hands the established connection to the next
// generation when there is one (Conn.HandOver; see Session), and otherwise
// relays it until it ends. The ctx passed to ServeConn is cancelled at the
// drain deadline: the handler must then return promptly; the server closes
// the client connection after ServeConn returns.
package l4

import (
	"context"
	"net"
	"net/netip"
	"time"
)

// Direction is the direction of a captured connection.
type Direction uint8

// The two capture directions.
const (
	Inbound Direction = iota
	Outbound
)

func (d Direction) String() string {
	if d == Inbound {
		return "inbound"
	}
	return "outbound"
}

// Conn is one accepted, captured connection.
type Conn struct {
	// Client is the accepted downstream connection. Handlers use it as a
	// *net.TCPConn so copies keep the kernel's splice path.
	Client *net.TCPConn
	// Direction is the listener it was accepted on.
	Direction Direction
	// OrigDst is the destination the client dialled before capture.
	OrigDst netip.AddrPort
	// Accepted is when the connection was accepted.
	Accepted time.Time

	// HandOver, if set, returns where a draining generation moves this
	// connection (nil: nowhere; it stays until it ends or the drain
	// deadline). Looked at once Draining is closed.
	HandOver func() *Sender

	// ResumedHTTP1 marks an HTTP/1.1 connection the previous generation's
	// L7 engine handed over between two requests (Session.HTTP1); Carried
	// holds the bytes of the next request it had read. A handler serving
	// HTTP/1.1 goes on serving it as such (no protocol detection), Carried
	// first; the server relays it to OrigDst when no handler takes it.
	ResumedHTTP1 bool
	Carried      []byte

	draining <-chan struct{}
}

func (c *Conn) handOver() *Sender {
	if c.HandOver == nil {
		return nil
	}
	return c.HandOver()
}

// NewConn returns a Conn; draining is closed when the generation drains.
func NewConn(client *net.TCPConn, dir Direction, dst netip.AddrPort, draining <-chan struct{}) *Conn {
	return &Conn{Client: client, Direction: dir, OrigDst: dst, Accepted: time.Now(), draining: draining}
}

// Draining is closed when the generation starts draining.
func (c *Conn) Draining() <-chan struct{} { return c.draining }

// Handler serves one connection until it is done. It must not close
// c.Client before returning only if it wants to; the server closes it after
// ServeConn returns in any case.
type Handler interface {
	ServeConn(ctx context.Context, c *Conn)
}

// HandlerFunc adapts a function to Handler.
type HandlerFunc func(ctx context.Context, c *Conn)

// ServeConn calls f.
func (f HandlerFunc) ServeConn(ctx context.Context, c *Conn) { f(ctx, c) }

// Chooser picks the handler for a connection, from its direction and
// original destination (and, if it wants, by sniffing inside a Handler).
// Returning nil selects the L4 passthrough.
type Chooser func(c *Conn) Handler
