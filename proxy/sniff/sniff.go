// Package sniff detects the application protocol of a freshly accepted
// connection from its first bytes: an HTTP/1.x request line, the HTTP/2
// connection preface, or anything else (opaque TCP). Detection is bounded by a
// timeout and a byte budget, never consumes data (the returned conn replays
// the peeked bytes), and every outcome is counted.
package sniff

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"time"

	"github.com/meshlet/meshlet/proxy/stats"
)

// Protocol is a detected application protocol.
type Protocol int

const (
	// TCP means the bytes are not HTTP (or nothing arrived in time): treat
	// the connection as opaque TCP.
	TCP Protocol = iota
	// HTTP1 means an HTTP/1.0 or HTTP/1.1 request line was seen.
	HTTP1
	// HTTP2 means the HTTP/2 connection preface (prior knowledge / h2c) was seen.
	HTTP2
)

// String returns the protocol's metric label value.
func (p Protocol) String() string {
	switch p {
	case HTTP1:
		return "http1"
	case HTTP2:
		return "http2"
	default:
		return "tcp"
	}
}

// Reason says why a connection was classified as it was.
type Reason string

// Detection reasons, used as the "reason" metric label.
const (
	ReasonMatched  Reason = "matched"   // HTTP/1 request line or HTTP/2 preface
	ReasonMismatch Reason = "mismatch"  // bytes that are not HTTP
	ReasonTimeout  Reason = "timeout"   // the client sent too little in time (server-first protocols)
	ReasonEOF      Reason = "eof"       // the client closed before sending enough
	ReasonError    Reason = "error"     // a read error other than timeout/EOF
	ReasonLongLine Reason = "long_line" // a valid HTTP method and target but no line end within the budget
)

// Preface is the HTTP/2 client connection preface (RFC 9113 section 3.4).
const Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

// Defaults for Options.
const (
	DefaultTimeout  = 5 * time.Second
	DefaultMaxBytes = 4096
)

// Options configure a Detector. Zero values mean the defaults.
type Options struct {
	// Timeout bounds how long detection waits for the first bytes
	// (default DefaultTimeout, like Istio's protocol detection timeout).
	Timeout time.Duration
	// MaxBytes bounds how many bytes are peeked (default DefaultMaxBytes).
	// A request line longer than this with a valid method is treated as HTTP/1.
	MaxBytes int
	// Stats holds the outcome counters (default: a private region).
	Stats *stats.Region
}

// Detector classifies connections and counts the outcomes.
type Detector struct {
	timeout  time.Duration
	maxBytes int
	outcomes *stats.CounterVec
}

// NewDetector returns a Detector with opts applied.
func NewDetector(opts Options) *Detector {
	d := &Detector{timeout: opts.Timeout, maxBytes: opts.MaxBytes}
	if d.timeout <= 0 {
		d.timeout = DefaultTimeout
	}
	if d.maxBytes < len(Preface) {
		d.maxBytes = DefaultMaxBytes
	}
	r := opts.Stats
	if r == nil {
		r = stats.NewPrivate()
	}
	d.outcomes = r.CounterVec("meshlet_proxy_protocol_detection_total",
		"Protocol detection outcomes on accepted connections, by detected protocol and reason.", "protocol", "reason")
	return d
}

// Result is the outcome of one detection.
type Result struct {
	Protocol Protocol
	Reason   Reason
}

// Detect peeks at c's first bytes and classifies them. The returned *Conn
// replays every peeked byte before reading from c, so callers must use it
// instead of c. Detect never returns an error: a failing read yields TCP with
// the reason recorded (the caller's relay then sees the same error). The read
// deadline set for detection is cleared before returning.
func (d *Detector) Detect(c net.Conn) (Result, *Conn) {
	res, buf := d.detect(c)
	d.outcomes.WithLabelValues(res.Protocol.String(), string(res.Reason)).Inc()
	return res, &Conn{Conn: c, peeked: buf}
}

func (d *Detector) detect(c net.Conn) (Result, []byte) {
	_ = c.SetReadDeadline(time.Now().Add(d.timeout))
	defer func() { _ = c.SetReadDeadline(time.Time{}) }()
	buf := make([]byte, 0, 256)
	for {
		if p, r, done := Classify(buf, d.maxBytes); done {
			return Result{p, r}, buf
		}
		if len(buf) == cap(buf) {
			nb := make([]byte, len(buf), min(2*cap(buf), d.maxBytes))
			copy(nb, buf)
			buf = nb
		}
		n, err := c.Read(buf[len(buf):cap(buf)])
		buf = buf[:len(buf)+n]
		if err != nil {
			if p, r, done := Classify(buf, d.maxBytes); done {
				return Result{p, r}, buf
			}
			switch {
			case errors.Is(err, os.ErrDeadlineExceeded):
				return Result{TCP, ReasonTimeout}, buf
			case errors.Is(err, io.EOF):
				return Result{TCP, ReasonEOF}, buf
			default:
				return Result{TCP, ReasonError}, buf
			}
		}
	}
}

// Classify decides from the bytes seen so far. done is false while more bytes
// could still change the answer. maxBytes is the peek budget: once b reaches
// it, Classify always decides. It is exported for fuzzing and for callers
// that have their own buffered bytes.
func Classify(b []byte, maxBytes int) (p Protocol, r Reason, done bool) {
	// HTTP/2 preface first: "PRI" would otherwise look like a method.
	if n := min(len(b), len(Preface)); bytes.Equal(b[:n], []byte(Preface[:n])) {
		if len(b) >= len(Preface) {
			return HTTP2, ReasonMatched, true
		}
		return TCP, "", false
	}
	// HTTP/1 request line: token SP request-target SP "HTTP/1." DIGIT CRLF.
	sp := -1
	for i, c := range b {
		if c == ' ' {
			sp = i
			break
		}
		if !isTokenChar(c) || i >= maxMethodLen {
			return TCP, ReasonMismatch, true
		}
	}
	if sp == 0 {
		return TCP, ReasonMismatch, true
	}
	if sp < 0 {
		if len(b) >= maxBytes {
			return TCP, ReasonMismatch, true
		}
		return TCP, "", false
	}
	rest := b[sp+1:]
	eol := bytes.IndexByte(rest, '\n')
	if eol < 0 {
		for _, c := range rest {
			if c < 0x21 && c != ' ' && c != '\r' || c == 0x7f {
				return TCP, ReasonMismatch, true
			}
		}
		if len(b) >= maxBytes {
			return HTTP1, ReasonLongLine, true
		}
		return TCP, "", false
	}
	line := bytes.TrimSuffix(rest[:eol], []byte{'\r'})
	i := bytes.LastIndexByte(line, ' ')
	if i <= 0 {
		return TCP, ReasonMismatch, true
	}
	v := line[i+1:]
	if len(v) == 8 && string(v[:7]) == "HTTP/1." && (v[7] == '0' || v[7] == '1') {
		return HTTP1, ReasonMatched, true
	}
	return TCP, ReasonMismatch, true
}

const maxMethodLen = 24

func isTokenChar(c byte) bool {
	if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' {
		return true
	}
	return bytes.IndexByte([]byte("!#$%&'*+-.^_`|~"), c) >= 0
}

// Conn is a connection whose first reads replay the bytes peeked during
// detection.
type Conn struct {
	net.Conn
	mu     sync.Mutex
	peeked []byte
}

// NewConn returns c with peeked replayed before what c reads next.
func NewConn(c net.Conn, peeked []byte) *Conn { return &Conn{Conn: c, peeked: peeked} }

// Read returns peeked bytes first, then reads from the underlying conn.
func (c *Conn) Read(p []byte) (int, error) {
	c.mu.Lock()
	if len(c.peeked) > 0 {
		n := copy(p, c.peeked)
		c.peeked = c.peeked[n:]
		c.mu.Unlock()
		return n, nil
	}
	c.mu.Unlock()
	return c.Conn.Read(p)
}

// Buffered returns the peeked bytes not yet read and stops replaying them:
// an L4 relay writes them to the upstream itself and then copies from Raw
// (keeping the kernel's splice path for *net.TCPConn).
func (c *Conn) Buffered() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	b := c.peeked
	c.peeked = nil
	return b
}

// Raw returns the underlying connection.
func (c *Conn) Raw() net.Conn { return c.Conn }
