package mtls

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/meshlet/meshlet/proxy/sniff"
	"github.com/meshlet/meshlet/proxy/stats"
)

// ErrPlaintextRefused is an inbound plain-text connection on a STRICT port.
var ErrPlaintextRefused = errors.New("mtls: plain text refused (PeerAuthentication STRICT)")

// Inbound terminates mutual TLS on inbound connections by
// PeerAuthentication mode, and counts each outcome in
// meshlet_mtls_inbound_connections_total{mode,result}.
type Inbound struct {
	srv *Server
	// Timeout bounds the wait for the client's first byte on a PERMISSIVE
	// port (a server-first protocol sends nothing: served as plain text
	// after it) and the handshake.
	timeout  time.Duration
	outcomes *stats.CounterVec
}

// NewInbound returns the inbound side for id. timeout bounds the wait
// for the first byte and the handshake (0: 5s); r holds the counters (nil:
// a private region).
func NewInbound(id Identity, timeout time.Duration, r *stats.Region) *Inbound {
	if timeout <= 0 {
		timeout = 5 * time.Second
	}
	if r == nil {
		r = stats.NewPrivate()
	}
	return &Inbound{srv: NewServer(id), timeout: timeout, outcomes: r.CounterVec("meshlet_mtls_inbound_connections_total",
		"Inbound connections by PeerAuthentication mode and outcome (mtls, plaintext, refused_plaintext, handshake_failed).", "mode", "result")}
}

// Accept prepares c for serving under mode: STRICT completes a mutual TLS
// handshake (plain text or a failed handshake is an error; the caller
// closes c); PERMISSIVE does the same when the first byte starts a TLS
// handshake record and otherwise returns c unchanged (the byte replayed);
// DISABLE (or an empty mode) returns c as is. The returned state is the
// verified TLS state, nil for plain text.
func (in *Inbound) Accept(ctx context.Context, c net.Conn, mode string) (net.Conn, *tls.ConnectionState, error) {
	switch mode {
	case "", Disable:
		return c, nil, nil
	case Strict, Permissive:
	default:
		return nil, nil, fmt.Errorf("mtls: unknown PeerAuthentication mode %q", mode)
	}
	_ = c.SetReadDeadline(time.Now().Add(in.timeout))
	var first [1]byte
	n, err := c.Read(first[:])
	_ = c.SetReadDeadline(time.Time{})
	if n == 0 {
		if mode == Permissive && errors.Is(err, os.ErrDeadlineExceeded) {
			// Nothing sent: a server-first protocol, which cannot be TLS.
			in.outcomes.WithLabelValues(mode, "plaintext").Inc()
			return c, nil, nil
		}
		if err == nil {
			err = errors.New("empty read")
		}
		in.outcomes.WithLabelValues(mode, "handshake_failed").Inc()
		return nil, nil, fmt.Errorf("mtls: reading the first byte: %w", err)
	}
	replay := sniff.NewConn(c, first[:1:1])
	// 0x16: a TLS handshake record (the ClientHello), as Envoy's
	// tls_inspector decides.
	if first[0] != 0x16 {
		if mode == Strict {
			in.outcomes.WithLabelValues(mode, "refused_plaintext").Inc()
			return nil, nil, ErrPlaintextRefused
		}
		in.outcomes.WithLabelValues(mode, "plaintext").Inc()
		return replay, nil, nil
	}
	tc := tls.Server(replay, in.srv.Config())
	hctx, cancel := context.WithTimeout(ctx, in.timeout)
	defer cancel()
	if err := tc.HandshakeContext(hctx); err != nil {
		in.outcomes.WithLabelValues(mode, "handshake_failed").Inc()
		return nil, nil, fmt.Errorf("mtls: inbound handshake: %w", err)
	}
	in.outcomes.WithLabelValues(mode, "mtls").Inc()
	cs := tc.ConnectionState()
	return tc, &cs, nil
}

// CountRefusedPlaintext counts a plain-text connection refused after it
// was accepted: its port became STRICT while it was open, and its next
// request was refused (mode STRICT, result refused_plaintext).
func (in *Inbound) CountRefusedPlaintext() {
	in.outcomes.WithLabelValues(Strict, "refused_plaintext").Inc()
}

// Dial completes an outbound mutual TLS handshake on raw with cfg (from
// ClientConfig) within ctx; on failure raw is closed.
func Dial(ctx context.Context, raw net.Conn, cfg *tls.Config) (*tls.Conn, error) {
	tc := tls.Client(raw, cfg)
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		return nil, fmt.Errorf("mtls: handshake with %s: %w", raw.RemoteAddr(), err)
	}
	return tc, nil
}

// ConnState returns the TLS state under c: c itself or what it wraps
// (through Raw() / NetConn() chains, e.g. a sniffed connection), nil if no
// layer is a *tls.Conn.
func ConnState(c net.Conn) *tls.ConnectionState {
	for i := 0; c != nil && i < 8; i++ {
		switch v := c.(type) {
		case *tls.Conn:
			cs := v.ConnectionState()
			return &cs
		case interface{ Raw() net.Conn }:
			c = v.Raw()
		case interface{ NetConn() net.Conn }:
			c = v.NetConn()
		default:
			return nil
		}
	}
	return nil
}
