package l7

import (
	"bufio"
	"bytes"
	"net"
	"sync"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/meshlet/meshlet/proxy/l7/route"
)

// Flow-control and buffering bounds of the HTTP/2 frame forwarder. What a
// peer may send us is bounded by the windows we advertise; what waits for a
// slow peer is bounded by its windows and by h2OutRoom.
const (
	h2StreamWin   = 1 << 20  // receive window per stream (bytes buffered per stream at most)
	h2ConnWin     = 4 << 20  // receive window per connection
	h2MaxFrame    = 16384    // the frame size we accept (the protocol default)
	h2OutRoom     = 1 << 20  // DATA waiting in a connection's write buffer before streams block
	h2OutMax      = 16 << 20 // control frames piled up by a peer that does not read: disconnect
	h2InitWin     = 65535    // the protocol's initial window
	h2DefStreams  = 100      // assumed peer concurrency limit until its SETTINGS say otherwise
	h2MaxReplay   = route.DefaultMaxReplayBody
	h2ResetsLimit = 100 // client stream cancellations tolerated before the ratio check (CVE-2023-44487)
)

// outBuf collects encoded frames until the connection's writer sends them.
type outBuf struct{ b []byte }

func (o *outBuf) Write(p []byte) (int, error) { o.b = append(o.b, p...); return len(p), nil }

// h2conn is one HTTP/2 connection's framing state, shared by the
// downstream and upstream sides. Frames are encoded into out under mu by
// whichever goroutine produces them; one writer goroutine per connection
// sends the batch, so a peer that reads slowly never blocks a producer.
type h2conn struct {
	nc net.Conn
	br *bufio.Reader
	fr *http2.Framer // reads from br (reader goroutine only), writes to out (under mu)

	wmu   sync.Mutex // serializes socket writes (writer goroutine, final flush)
	mu    sync.Mutex
	out   outBuf
	spare []byte
	enc   *hpack.Encoder
	encB  bytes.Buffer

	sendWin      int64 // connection-level window the peer granted us
	peerMaxFrame uint32
	peerInitWin  int64
	recvWin      int64 // connection-level bytes the peer may still send
	recvUnacked  int64 // consumed, not yet returned with WINDOW_UPDATE
	blocked      []*h2stream
	failed       bool // writer failed or the connection was torn down

	wake chan struct{}
	done chan struct{}
	once sync.Once
}

func (c *h2conn) init(nc net.Conn, maxHeaderList uint32) {
	c.nc = nc
	c.br = bufio.NewReaderSize(nc, 32<<10)
	c.fr = http2.NewFramer(&c.out, c.br)
	c.fr.SetReuseFrames()
	c.fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	c.fr.MaxHeaderListSize = maxHeaderList
	c.fr.SetMaxReadFrameSize(h2MaxFrame)
	c.enc = hpack.NewEncoder(&c.encB)
	c.sendWin, c.peerMaxFrame, c.peerInitWin, c.recvWin = h2InitWin, 16384, h2InitWin, h2InitWin
	c.wake = make(chan struct{}, 1)
	c.done = make(chan struct{})
}

// kick wakes the writer.
func (c *h2conn) kick() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

// room is how much DATA may still be queued in out (mu held).
func (c *h2conn) room() int64 { return h2OutRoom - int64(len(c.out.b)) }

// writeLoop sends what producers queued until the connection ends; resume
// is called after a write when streams wait for buffer room.
func (c *h2conn) writeLoop(resume func()) {
	for {
		select {
		case <-c.wake:
		case <-c.done:
			return
		}
		if !c.flush() {
			c.nc.Close() // the reader sees the error and tears the connection down
			return
		}
		c.mu.Lock()
		waiting := len(c.blocked) > 0
		c.mu.Unlock()
		if waiting {
			resume()
		}
	}
}

// flush writes the queued frames; false when the socket failed.
func (c *h2conn) flush() bool {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	buf := c.out.b
	c.out.b = c.spare[:0]
	c.spare = nil
	c.mu.Unlock()
	if len(buf) == 0 {
		c.mu.Lock()
		c.spare = buf
		c.mu.Unlock()
		return true
	}
	_, err := c.nc.Write(buf)
	c.mu.Lock()
	if cap(buf) <= 256<<10 {
		c.spare = buf[:0]
	}
	if err != nil {
		c.failed = true
	}
	c.mu.Unlock()
	return err == nil
}

// backlogged reports whether more than limit bytes wait for the peer: it
// asks for answers (PING, SETTINGS, …) it does not read.
func (c *h2conn) backlogged(limit int64) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return int64(len(c.out.b)) > limit
}

// stop ends the writer; the caller closes the socket.
func (c *h2conn) stop() { c.once.Do(func() { close(c.done) }) }

// writeHeaders encodes fields with the connection's HPACK state and writes
// HEADERS (+CONTINUATION) frames (mu held).
func (c *h2conn) writeHeaders(id uint32, fields []hpack.HeaderField, end bool) {
	c.encB.Reset()
	for _, f := range fields {
		_ = c.enc.WriteField(f)
	}
	block := c.encB.Bytes()
	maxFrame := int(c.peerMaxFrame)
	first := true
	for first || len(block) > 0 {
		chunk := block
		if len(chunk) > maxFrame {
			chunk = chunk[:maxFrame]
		}
		block = block[len(chunk):]
		if first {
			_ = c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: chunk, EndStream: end, EndHeaders: len(block) == 0})
			first = false
		} else {
			_ = c.fr.WriteContinuation(id, len(block) == 0, chunk)
		}
	}
}

// sendData writes as much of data as the connection window, the stream
// window *win and the buffer room allow, as DATA frames; end is set on the
// last frame when all of data went out. It returns the bytes written (mu held).
func (c *h2conn) sendData(id uint32, win *int64, data []byte, end bool) (n int, ended bool) {
	if len(data) == 0 {
		if end {
			_ = c.fr.WriteData(id, true, nil)
			return 0, true
		}
		return 0, false
	}
	allow := min(c.sendWin, *win, c.room(), int64(len(data)))
	if allow <= 0 {
		return 0, false
	}
	for int64(n) < allow {
		chunk := data[n:allow]
		if len(chunk) > int(c.peerMaxFrame) {
			chunk = chunk[:c.peerMaxFrame]
		}
		n += len(chunk)
		last := end && n == len(data)
		_ = c.fr.WriteData(id, last, chunk)
		ended = last
	}
	c.sendWin -= int64(n)
	*win -= int64(n)
	return n, ended
}

// consumed returns n bytes of connection window to the peer once a quarter
// of the window is used up (mu held).
func (c *h2conn) consumed(n int64, fs *flushSet) {
	if n <= 0 {
		return
	}
	c.recvUnacked += n
	if c.recvUnacked >= h2ConnWin/4 {
		_ = c.fr.WriteWindowUpdate(0, uint32(c.recvUnacked))
		c.recvWin += c.recvUnacked
		c.recvUnacked = 0
		fs.add(c)
	}
}

// block remembers that s waits for window or room on c (mu held).
func (c *h2conn) block(s *h2stream) {
	for _, b := range c.blocked {
		if b == s {
			return
		}
	}
	c.blocked = append(c.blocked, s)
}

// takeBlocked returns and clears the waiting streams (mu held).
func (c *h2conn) takeBlocked() []*h2stream {
	b := c.blocked
	c.blocked = nil
	return b
}

// flushSet collects the connections a goroutine wrote to, so that it wakes
// each writer once per batch (when its own input is drained) instead of once
// per frame: fewer, larger writes.
type flushSet struct{ conns []*h2conn }

func (fs *flushSet) add(c *h2conn) {
	for _, x := range fs.conns {
		if x == c {
			return
		}
	}
	fs.conns = append(fs.conns, c)
}

func (fs *flushSet) flush() {
	for i, c := range fs.conns {
		c.kick()
		fs.conns[i] = nil
	}
	fs.conns = fs.conns[:0]
}

// hop-by-hop and connection-specific fields never forwarded over HTTP/2.
func h2HopField(name, value string) bool {
	switch name {
	case "connection", "keep-alive", "proxy-connection", "transfer-encoding", "upgrade", "host":
		return true
	case "te":
		return value != "trailers"
	}
	return false
}
