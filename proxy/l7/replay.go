package l7

import (
	"errors"
	"io"
	"sync"
)

// replayBody records a request body as attempts read it, up to a bound, so
// that a retry can replay what the failed attempt consumed and then continue
// with the rest. Streaming bodies (gRPC) keep streaming: nothing is read
// ahead of the upstream.
type replayBody struct {
	mu       sync.Mutex
	src      io.ReadCloser
	buf      []byte
	limit    int64
	overflow bool // more than limit was read: no replay possible
	eof      bool
	srcErr   error
	gen      int // current attempt; older attempts' readers are dead
}

func newReplayBody(src io.ReadCloser, limit int64) *replayBody {
	return &replayBody{src: src, limit: limit}
}

// replayable reports whether a new attempt could see the whole body.
func (b *replayBody) replayable() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return !b.overflow
}

// attempt returns a reader for a new attempt and invalidates older ones.
func (b *replayBody) attempt() io.ReadCloser {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.gen++
	return &replayReader{b: b, gen: b.gen}
}

// Close closes the source body.
func (b *replayBody) Close() error { return b.src.Close() }

type replayReader struct {
	b   *replayBody
	gen int
	pos int
}

var errStaleAttempt = errors.New("request body read by a superseded attempt")

func (r *replayReader) Read(p []byte) (int, error) {
	b := r.b
	b.mu.Lock()
	defer b.mu.Unlock()
	if r.gen != b.gen {
		return 0, errStaleAttempt
	}
	if r.pos < len(b.buf) {
		n := copy(p, b.buf[r.pos:])
		r.pos += n
		return n, nil
	}
	if b.overflow && r.pos != len(b.buf) {
		return 0, errStaleAttempt
	}
	if b.eof {
		return 0, io.EOF
	}
	if b.srcErr != nil {
		return 0, b.srcErr
	}
	// Reading under the lock serializes attempts; a stale attempt's blocked
	// read still records its bytes for the current one.
	n, err := b.src.Read(p)
	if n > 0 {
		if !b.overflow && int64(len(b.buf)+n) <= b.limit {
			b.buf = append(b.buf, p[:n]...)
			r.pos += n
		} else {
			b.overflow = true
			b.buf = nil
			r.pos = 0
		}
	}
	if err == io.EOF {
		b.eof = true
	} else if err != nil {
		b.srcErr = err
	}
	if r.gen != b.gen {
		// Superseded while blocked: the bytes are kept for the new attempt.
		if b.overflow {
			b.srcErr = errStaleAttempt
		}
		return 0, errStaleAttempt
	}
	return n, err
}

// Close does not close the source: the next attempt may still need it.
func (r *replayReader) Close() error { return nil }
