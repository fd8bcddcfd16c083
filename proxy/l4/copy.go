package l4

import (
	"io"
	"net"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// copyBufSize is the size of a pooled relay buffer. A read that fills it
// means the stream is moving in bulk, and the rest of it is spliced.
const copyBufSize = 16 << 10

var (
	copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}
	// buffersInUse counts pooled buffers taken and not yet returned: one per
	// direction that is moving bytes right now, none for idle connections.
	buffersInUse atomic.Int64
	// bulkStreams counts directions that moved on to splice(2).
	bulkStreams atomic.Int64
)

// copyConn copies src to dst until src's EOF (nil error) or an error, and
// returns the bytes written.
//
// Request/response traffic (a few KiB each way, the common case for a
// sidecar) is relayed with read(2)/write(2) through a pooled buffer that is
// held only while bytes are in flight: waiting for the next request holds no
// memory, so idle keep-alive connections cost their sockets alone. splice(2)
// through a pipe costs a syscall more per message (the pipe in and out plus
// the pipe's page bookkeeping) and measured slower for 1 KiB messages, so it
// is kept for what it is good at: once a read fills the whole buffer the
// stream is a bulk transfer and the rest of it goes through io.Copy, which
// the runtime turns into splice(2) between the two sockets (no copy through
// user space).
func copyConn(dst, src *net.TCPConn) (int64, error) {
	rc, err := src.SyscallConn()
	if err != nil {
		return io.Copy(dst, src)
	}
	var total int64
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
		if err != nil { // closed or deadline: no buffer is held
			return total, err
		}
		if rerr != nil || n <= 0 {
			release(bp)
			if rerr != nil {
				return total, rerr
			}
			return total, nil // EOF
		}
		w, werr := dst.Write((*bp)[:n])
		total += int64(w)
		release(bp)
		if werr != nil {
			return total, werr
		}
		if n == copyBufSize {
			bulkStreams.Add(1)
			rest, err := io.Copy(dst, src)
			return total + rest, err
		}
	}
}

func release(bp *[]byte) {
	buffersInUse.Add(-1)
	copyBufs.Put(bp)
}
