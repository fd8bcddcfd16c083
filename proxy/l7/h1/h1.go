// Package h1 is the engine's HTTP/1.1 codec: the request head parser of
// its downstream connections (Parser, which takes only what it can parse
// exactly as net/http would and names the reason for anything else), the
// response writer that frames what the handler writes (ResponseWriter:
// Content-Length or chunked, trailers, informational heads, Connection:
// close), and the buffers both directions share: the connection read
// buffer, the body size the codec buffers and the pool of body buffers
// (upstream.Cluster's fast path uses the latter two). The connection loop
// that drives them — idle and header timeouts, the client-gone watch, the
// handoff to net/http and the move to the next generation — is the
// engine's (proxy/l7/h1server.go): it needs the engine's drain, metrics
// and hand-over.
package h1

import "sync"

// MaxBody is the largest request body the codec buffers; larger or
// streamed bodies go through net/http.
const MaxBody = 64 << 10

var bodyBufs = sync.Pool{New: func() any { b := make([]byte, 0, 4<<10); return &b }}

// GetBuf returns an empty body buffer from the pool; PutBuf returns it.
func GetBuf() *[]byte { return bodyBufs.Get().(*[]byte) }

// PutBuf returns a buffer GetBuf gave to the pool.
func PutBuf(b *[]byte) { bodyBufs.Put(b) }
