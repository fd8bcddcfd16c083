// Package h1 holds what the engine's HTTP/1.1 codec shares between its
// server side (the downstream connections it parses) and its client side
// (upstream.Cluster's fast path): the body size it buffers, and the pool of
// body buffers.
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
