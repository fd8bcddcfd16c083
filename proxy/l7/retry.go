package l7

import (
	"errors"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
)

// retryPolicy is a compiled RetryPolicy.
type retryPolicy struct {
	attempts      int
	perTry        time.Duration
	base, maxWait time.Duration
	maxBody       int64
	on5xx         bool
	onGateway     bool
	onConnect     bool
	onReset       bool
	codes         map[int]bool
	grpcCodes     map[int]bool
}

const defaultMaxReplayBody = 64 << 10

func compileRetry(rp *config.RetryPolicy) *retryPolicy {
	// attempts 0 with a per-try timeout: no retry, but the one try is
	// still bounded (as Envoy's per_try_timeout with num_retries 0).
	if rp == nil || rp.Attempts == 0 && rp.PerTryTimeout.D == 0 {
		return nil
	}
	p := &retryPolicy{attempts: rp.Attempts, perTry: rp.PerTryTimeout.D, base: rp.BaseInterval.D,
		maxWait: rp.MaxInterval.D, maxBody: rp.MaxBodyBytes, codes: map[int]bool{}, grpcCodes: map[int]bool{}}
	if p.base == 0 {
		p.base = 25 * time.Millisecond
	}
	if p.maxWait == 0 {
		p.maxWait = 10 * p.base
	}
	if p.maxBody == 0 {
		p.maxBody = defaultMaxReplayBody
	}
	on := rp.RetryOn
	if len(on) == 0 {
		// Istio's default retryOn.
		on = []string{"connect-failure", "refused-stream", "unavailable", "cancelled", "503"}
	}
	for _, c := range on {
		switch c {
		case "5xx":
			p.on5xx = true
		case "gateway-error":
			p.onGateway = true
		case "connect-failure":
			p.onConnect = true
		case "reset", "refused-stream":
			p.onReset = true
		case "retriable-status-codes":
			for _, code := range rp.RetriableStatusCodes {
				p.codes[code] = true
			}
		case "cancelled":
			p.grpcCodes[1] = true
		case "deadline-exceeded":
			p.grpcCodes[4] = true
		case "resource-exhausted":
			p.grpcCodes[8] = true
		case "internal":
			p.grpcCodes[13] = true
		case "unavailable":
			p.grpcCodes[14] = true
		default:
			if n, err := strconv.Atoi(c); err == nil {
				p.codes[n] = true
			}
		}
	}
	return p
}

// retriable reports whether an attempt's result should be retried.
func (p *retryPolicy) retriable(resp *http.Response, err error) bool {
	if err != nil {
		var ce *upstream.ConnectError
		if errors.As(err, &ce) {
			return p.onConnect || p.on5xx || p.onGateway
		}
		if errors.Is(err, upstream.ErrPerTryTimeout) {
			return true // Envoy retries per-try timeouts whenever retries are on
		}
		return p.onReset || p.on5xx
	}
	s := resp.StatusCode
	if p.on5xx && s >= 500 || p.onGateway && (s == 502 || s == 503 || s == 504) || p.codes[s] {
		return true
	}
	if len(p.grpcCodes) > 0 {
		if v := resp.Header.Get("Grpc-Status"); v != "" { // trailers-only response
			if n, err := strconv.Atoi(v); err == nil && p.grpcCodes[n] {
				return true
			}
		}
	}
	return false
}

// backoff is exponential with full jitter (Envoy's).
func (p *retryPolicy) backoff(retry int) time.Duration {
	d := p.base << min(retry, 16)
	if d > p.maxWait || d <= 0 {
		d = p.maxWait
	}
	return time.Duration(rand.Int64N(int64(d) + 1))
}

// retryBudget is linkerd2's retry budget: retries may be at most Ratio times
// the requests of the last TTL, plus MinPerSecond×TTL.
type retryBudget struct {
	ratio, minPerSec float64
	mu               sync.Mutex
	buckets          []budgetBucket // one per second of the TTL
}

type budgetBucket struct {
	sec           int64
	reqs, retries float64
}

func newRetryBudget(b *config.RetryBudget) *retryBudget {
	if b == nil {
		return nil
	}
	ttl := b.TTL.D
	if ttl == 0 {
		ttl = 10 * time.Second
	}
	n := min(max(int(ttl/time.Second), 1), 60)
	return &retryBudget{ratio: b.Ratio, minPerSec: b.MinPerSecond, buckets: make([]budgetBucket, n)}
}

func (b *retryBudget) bucket(now int64) *budgetBucket {
	bk := &b.buckets[now%int64(len(b.buckets))]
	if bk.sec != now {
		*bk = budgetBucket{sec: now}
	}
	return bk
}

func (b *retryBudget) deposit() {
	if b == nil {
		return
	}
	now := time.Now().Unix()
	b.mu.Lock()
	b.bucket(now).reqs++
	b.mu.Unlock()
}

func (b *retryBudget) withdraw() bool {
	if b == nil {
		return true
	}
	now := time.Now().Unix()
	b.mu.Lock()
	defer b.mu.Unlock()
	var reqs, retries float64
	for i := range b.buckets {
		if bk := &b.buckets[i]; now-bk.sec < int64(len(b.buckets)) {
			reqs += bk.reqs
			retries += bk.retries
		}
	}
	if retries+1 > b.ratio*reqs+b.minPerSec*float64(len(b.buckets)) {
		return false
	}
	b.bucket(now).retries++
	return true
}

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
