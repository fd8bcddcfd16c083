package route

import (
	"errors"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
)

// RetryPolicy is a compiled config.RetryPolicy.
type RetryPolicy struct {
	// Attempts is the number of retries after the first try.
	Attempts int
	// PerTry bounds each try (0: only the route timeout).
	PerTry        time.Duration
	base, maxWait time.Duration
	// MaxBody is the largest request body kept for replay in a retry.
	MaxBody   int64
	on5xx     bool
	onGateway bool
	onConnect bool
	onReset   bool
	codes     map[int]bool
	grpcCodes map[int]bool
}

// DefaultMaxReplayBody is the largest request body replayed in a retry
// (or mirrored) unless the policy says otherwise.
const DefaultMaxReplayBody = 64 << 10

// CompileRetry compiles rp; nil when it asks for neither retries nor a
// per-try timeout.
func CompileRetry(rp *config.RetryPolicy) *RetryPolicy {
	// attempts 0 with a per-try timeout: no retry, but the one try is
	// still bounded (as Envoy's per_try_timeout with num_retries 0).
	if rp == nil || rp.Attempts == 0 && rp.PerTryTimeout.D == 0 {
		return nil
	}
	p := &RetryPolicy{Attempts: rp.Attempts, PerTry: rp.PerTryTimeout.D, base: rp.BaseInterval.D,
		maxWait: rp.MaxInterval.D, MaxBody: rp.MaxBodyBytes, codes: map[int]bool{}, grpcCodes: map[int]bool{}}
	if p.base == 0 {
		p.base = 25 * time.Millisecond
	}
	if p.maxWait == 0 {
		p.maxWait = 10 * p.base
	}
	if p.MaxBody == 0 {
		p.MaxBody = DefaultMaxReplayBody
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

// Retriable reports whether an attempt's result should be retried.
func (p *RetryPolicy) Retriable(resp *http.Response, err error) bool {
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

// Backoff is the wait before retry number retry (from 0): exponential
// with full jitter (Envoy's).
func (p *RetryPolicy) Backoff(retry int) time.Duration {
	d := p.base << min(retry, 16)
	if d > p.maxWait || d <= 0 {
		d = p.maxWait
	}
	return time.Duration(rand.Int64N(int64(d) + 1))
}

// Budget is linkerd2's retry budget: retries may be at most Ratio times
// the requests of the last TTL, plus MinPerSecond×TTL. A nil Budget
// allows every retry.
type Budget struct {
	ratio, minPerSec float64
	mu               sync.Mutex
	buckets          []budgetBucket // one per second of the TTL
}

type budgetBucket struct {
	sec           int64
	reqs, retries float64
}

// NewBudget returns the budget b describes (nil: none).
func NewBudget(b *config.RetryBudget) *Budget {
	if b == nil {
		return nil
	}
	ttl := b.TTL.D
	if ttl == 0 {
		ttl = 10 * time.Second
	}
	n := min(max(int(ttl/time.Second), 1), 60)
	return &Budget{ratio: b.Ratio, minPerSec: b.MinPerSecond, buckets: make([]budgetBucket, n)}
}

func (b *Budget) bucket(now int64) *budgetBucket {
	bk := &b.buckets[now%int64(len(b.buckets))]
	if bk.sec != now {
		*bk = budgetBucket{sec: now}
	}
	return bk
}

// Deposit counts a request that went upstream.
func (b *Budget) Deposit() {
	if b == nil {
		return
	}
	now := time.Now().Unix()
	b.mu.Lock()
	b.bucket(now).reqs++
	b.mu.Unlock()
}

// Requests is the number of requests deposited in the last TTL (tests and
// debugging).
func (b *Budget) Requests() float64 {
	now := time.Now().Unix()
	b.mu.Lock()
	defer b.mu.Unlock()
	var n float64
	for i := range b.buckets {
		if bk := &b.buckets[i]; now-bk.sec < int64(len(b.buckets)) {
			n += bk.reqs
		}
	}
	return n
}

// Withdraw takes a retry from the budget; false when it is spent.
func (b *Budget) Withdraw() bool {
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
