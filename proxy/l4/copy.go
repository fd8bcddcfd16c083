package l4

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// copyBufSize is the size of a pooled relay buffer. A read that fills it
// means the stream is moving in bulk, and the rest of it is spliced.
const copyBufSize = 16 << 10

// maxSplice bounds one splice(2) into the relay's pipe, and so the bytes an
// interrupted bulk copy can hold: what is carried in a hand-over message
// stays well below a unix socket's default send buffer.
const maxSplice = 32 << 10

var (
	copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}
	// buffersInUse counts pooled buffers taken and not yet returned: one per
	// direction that is moving bytes right now, none for idle connections.
	buffersInUse atomic.Int64
	// bulkStreams counts directions that moved on to splice(2).
	bulkStreams atomic.Int64
)

// copied is the outcome of one direction's copy.
type copied struct {
	// n is the bytes written to the destination.
	n int64
	// carry holds bytes read from the source and not written when the copy
	// was interrupted (its own slice, never a pooled buffer).
	carry []byte
	// err is nil at the source's EOF; os.ErrDeadlineExceeded when
	// interrupted (see interrupt).
	err error
}

// interrupted reports whether the copy stopped because of interrupt rather
// than because the stream ended or failed.
func (c copied) interrupted() bool { return errors.Is(c.err, os.ErrDeadlineExceeded) }

// copyConn copies src to dst until src's EOF (nil error) or an error, and
// returns the bytes written.
func copyConn(dst, src *net.TCPConn) (int64, error) {
	r := pump(dst, src, nil)
	return r.n, r.err
}

// pump writes carry to dst, then copies src to dst until src's EOF (nil
// error), an error, or an interrupt (a deadline set on both connections;
// the bytes read and not yet written are returned as carry, so nothing is
// lost when the connection moves to another process).
//
// Request/response traffic (a few KiB each way, the common case for a
// sidecar) is relayed with read(2)/write(2) through a pooled buffer that is
// held only while bytes are in flight: waiting for the next request holds no
// memory, so idle keep-alive connections cost their sockets alone. splice(2)
// through a pipe costs a syscall more per message and measured slower for
// 1 KiB messages, so it is kept for what it is good at: once a read fills
// the whole buffer the stream is a bulk transfer and the rest of it is
// spliced between the two sockets through a pipe (no copy through user
// space); an interrupted splice reads what is left in the pipe back out.
func pump(dst, src *net.TCPConn, carry []byte) copied {
	var total int64
	if len(carry) > 0 {
		w, err := dst.Write(carry)
		total += int64(w)
		if err != nil {
			return copied{n: total, carry: carry[w:], err: err}
		}
	}
	rc, err := src.SyscallConn()
	if err != nil {
		return copied{err: err}
	}
	for {
		var (
			bp   *[]byte
			n    int
			rerr error
		)
		err := rc.Read(func(fd uintptr) bool {
			bp = copyBufs.Get().(*[]byte)
			for {
				n, rerr = unix.Read(int(fd), *bp)
				if rerr != unix.EINTR {
					break
				}
			}
			if rerr == unix.EAGAIN {
				// Nothing to read: give the buffer back while the
				// poller waits for the socket.
				copyBufs.Put(bp)
				bp = nil
				return false
			}
			buffersInUse.Add(1)
			return true
		})
		if err != nil { // closed or interrupted: no buffer is held
			return copied{n: total, err: err}
		}
		if rerr != nil || n <= 0 {
			release(bp)
			return copied{n: total, err: rerr} // nil: EOF
		}
		w, werr := dst.Write((*bp)[:n])
		total += int64(w)
		var rest []byte
		if werr != nil && w < n {
			rest = append([]byte(nil), (*bp)[w:n]...)
		}
		release(bp)
		if werr != nil {
			return copied{n: total, carry: rest, err: werr}
		}
		if n == copyBufSize {
			bulkStreams.Add(1)
			r := splice(dst, src)
			r.n += total
			return r
		}
	}
}

// splice moves src to dst through a pipe until EOF, an error or an
// interrupt; on an interrupt, bytes already in the pipe are returned as
// carry.
func splice(dst, src *net.TCPConn) copied {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC|unix.O_NONBLOCK); err != nil {
		return copied{err: os.NewSyscallError("pipe2", err)}
	}
	defer unix.Close(p[0])
	defer unix.Close(p[1])
	rs, err := src.SyscallConn()
	if err != nil {
		return copied{err: err}
	}
	ws, err := dst.SyscallConn()
	if err != nil {
		return copied{err: err}
	}
	const flags = unix.SPLICE_F_MOVE | unix.SPLICE_F_NONBLOCK
	var total int64
	for {
		var in int
		var serr error
		err := rs.Read(func(fd uintptr) bool {
			var n int64
			for {
				n, serr = unix.Splice(int(fd), nil, p[1], nil, maxSplice, flags)
				if serr != unix.EINTR {
					break
				}
			}
			if serr == unix.EAGAIN {
				serr = nil
				return false
			}
			in = int(n)
			return true
		})
		if err != nil {
			return copied{n: total, err: err} // the pipe is empty here
		}
		if serr != nil {
			return copied{n: total, err: os.NewSyscallError("splice", serr)}
		}
		if in == 0 {
			return copied{n: total} // EOF
		}
		for in > 0 {
			var out int
			err := ws.Write(func(fd uintptr) bool {
				var n int64
				for {
					n, serr = unix.Splice(p[0], nil, int(fd), nil, in, flags)
					if serr != unix.EINTR {
						break
					}
				}
				if serr == unix.EAGAIN {
					serr = nil
					return false
				}
				if serr == nil && n == 0 {
					serr = unix.EPIPE // an empty pipe that should hold bytes
				}
				out = int(n)
				return true
			})
			if err == nil && serr != nil {
				err = os.NewSyscallError("splice", serr)
			}
			if err != nil {
				// Take back what the pipe still holds: the caller
				// carries it (interrupt) or drops it with the
				// connection (error).
				rest := make([]byte, in)
				got := 0
				for got < in {
					n, rerr := unix.Read(p[0], rest[got:])
					if n <= 0 || rerr != nil {
						break
					}
					got += n
				}
				return copied{n: total, carry: rest[:got], err: err}
			}
			total += int64(out)
			in -= out
		}
	}
}

func release(bp *[]byte) {
	buffersInUse.Add(-1)
	copyBufs.Put(bp)
}
