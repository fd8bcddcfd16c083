// Package h1 is the engine's HTTP/1.1 codec: the request head parser of
// its downstream connections (Parser, which takes only what it can parse
// exactly as net/http would and names the reason for anything else), and
// what the downstream side and upstream.Cluster's fast path share: the
// body size the codec buffers and the pool of body buffers.
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
