package l7

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptrace"
	"sync"
	"sync/atomic"
	"time"
)

// router is ReverseProxy's transport: it admits the request through the
// cluster's circuit breaker, picks endpoints, retries, and feeds outlier
// detection and the balancers.
type router struct{ p *Engine }

func (rt *router) RoundTrip(req *http.Request) (*http.Response, error) {
	st, _ := req.Context().Value(stateKey{}).(*reqState)
	if st == nil || st.dest == nil {
		return nil, errors.New("l7: request without routing state")
	}
	cl := st.dest.cluster
	pl := cl.pool(st.dest.subset)
	if cl.name == "inbound" || cl.name == "passthrough" {
		pl = nil // original destination
	}

	// Circuit breaker: concurrent requests.
	if n := cl.active.Add(1); cl.maxReq > 0 && n > cl.maxReq {
		cl.active.Add(-1)
		cl.m.overflow.WithLabelValues("requests").Inc()
		return nil, errOverflow
	}

	rp := st.retry
	var body *replayBody
	if rp != nil && rp.attempts > 0 && req.Body != nil && req.Body != http.NoBody {
		body = newReplayBody(req.Body, rp.maxBody)
	}
	var last *endpoint
	for attempt := 0; ; attempt++ {
		var ep *endpoint
		if pl == nil {
			ep = cl.origDst(st.dst)
		} else if ep = pl.pick(cl.lb, last, cl.now()); ep == nil {
			cl.active.Add(-1) // release the circuit breaker slot
			return nil, errNoEndpoint
		}
		last = ep
		st.upstream = ep.addr
		st.attempts = attempt + 1

		// An attempt needs its own cancelable context only when something
		// cancels it (per-try timeout, pending limit); otherwise the request's
		// context serves, saving a context, a closure and its cancel per request.
		ctx, cancel := req.Context(), noCancel
		if (rp != nil && rp.perTry > 0) || cl.maxPend > 0 {
			ctx, cancel = context.WithCancelCause(req.Context())
		}
		var perTry *time.Timer
		if rp != nil && rp.perTry > 0 {
			perTry = time.AfterFunc(rp.perTry, func() { cancel(errPerTryTimeout) })
		}
		if cl.maxPend > 0 {
			ctx = cl.pendingTrace(ctx, cancel)
		}
		var ta *tlsAttempt
		if cl.tls != nil {
			ta = new(tlsAttempt)
			ctx = cl.tls.traced(ctx, ta)
		}
		// One shallow copy of req carrying the attempt's context (and URL).
		out := req.WithContext(ctx)
		u := *req.URL
		u.Host = ep.addr
		u.Scheme = cl.scheme()
		out.URL = &u
		if body != nil {
			out.Body = body.attempt()
		}
		if st.grpc && !st.deadline.IsZero() {
			// Propagate the remaining deadline to the upstream.
			h := out.Header.Clone()
			h.Set("Grpc-Timeout", formatGRPCTimeout(time.Until(st.deadline)))
			out.Header = h
		}

		ep.inflight.Add(1)
		ep.picked.Add(1)
		t0 := time.Now()
		resp, err := cl.transport(out).RoundTrip(out)
		if perTry != nil {
			perTry.Stop()
		}
		if err != nil && ta != nil {
			err = cl.tls.classify(ep.addr, err, ta, ctx.Err() != nil)
		}
		if err != nil {
			if c := context.Cause(ctx); c != nil && (errors.Is(c, errPerTryTimeout) || errors.Is(c, errPendingFull)) && !errors.Is(err, c) {
				err = errors.Join(c, err)
			}
		}
		o := classify(req.Context(), resp, err)
		if o == outcomeOK || o == outcome5xx || o == outcomeGateway {
			ep.observeRTT(time.Since(t0), time.Now())
		}
		cl.record(ep, o)

		if rp != nil && attempt < rp.attempts && !errors.Is(err, errPendingFull) && req.Context().Err() == nil &&
			rp.retriable(resp, err) && (body == nil || body.replayable()) {
			if st.route.budget.withdraw() {
				ep.inflight.Add(-1)
				if resp != nil {
					drainAndClose(resp.Body)
				}
				cancel(nil)
				cl.m.retries.Inc()
				select {
				case <-time.After(rp.backoff(attempt)):
					continue
				case <-req.Context().Done():
					cl.active.Add(-1) // release the circuit breaker slot
					return nil, context.Cause(req.Context())
				}
			}
			cl.m.retryBudgetExhausted.Inc()
		}
		if err != nil {
			ep.inflight.Add(-1)
			cancel(nil)
			cl.active.Add(-1) // release the circuit breaker slot
			if body != nil {
				body.Close()
			}
			return nil, err
		}
		resp.Body = &trackedBody{ReadCloser: resp.Body, ep: ep, cl: cl, cancel: cancel}
		return resp, nil
	}
}

func noCancel(error) {}

// pendingTrace enforces maxPendingRequests: a request waiting for a
// connection counts as pending; one over the limit is cancelled.
func (c *cluster) pendingTrace(ctx context.Context, cancel context.CancelCauseFunc) context.Context {
	var waiting atomic.Bool
	return httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		GetConn: func(string) {
			if c.pending.Add(1) > c.maxPend {
				c.pending.Add(-1)
				c.m.overflow.WithLabelValues("pending").Inc()
				cancel(errPendingFull)
				return
			}
			waiting.Store(true)
		},
		GotConn: func(httptrace.GotConnInfo) {
			if waiting.CompareAndSwap(true, false) {
				c.pending.Add(-1)
			}
		},
	})
}

func classify(reqCtx context.Context, resp *http.Response, err error) outcome {
	if err != nil {
		var ce *connectError
		switch {
		case errors.As(err, &ce):
			return outcomeConnect
		case reqCtx.Err() != nil, errors.Is(err, errPendingFull):
			return outcomeLocal
		case errors.Is(err, errPerTryTimeout):
			return outcomeGateway
		}
		return outcomeGateway
	}
	switch s := resp.StatusCode; {
	case s == 502 || s == 503 || s == 504:
		return outcomeGateway
	case s >= 500:
		return outcome5xx
	}
	return outcomeOK
}

func drainAndClose(b io.ReadCloser) {
	_, _ = io.CopyN(io.Discard, b, 4<<10)
	b.Close()
}

// trackedBody releases the attempt once when the response body is
// finished: the endpoint's in-flight count, the attempt's context and the
// cluster's circuit breaker slot. (Fields, not a closure: one allocation.)
type trackedBody struct {
	io.ReadCloser
	once   sync.Once
	ep     *endpoint
	cl     *cluster
	cancel context.CancelCauseFunc
}

func (b *trackedBody) done() {
	b.ep.inflight.Add(-1)
	b.cancel(nil)
	b.cl.active.Add(-1)
}

func (b *trackedBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil {
		b.once.Do(b.done)
	}
	return n, err
}

func (b *trackedBody) Close() error {
	err := b.ReadCloser.Close()
	b.once.Do(b.done)
	return err
}

// Write supports upgraded (101) responses, whose body is the raw connection.
func (b *trackedBody) Write(p []byte) (int, error) {
	if w, ok := b.ReadCloser.(io.Writer); ok {
		return w.Write(p)
	}
	return 0, errors.New("l7: response body is not writable")
}

// origDst returns the endpoint for an original destination.
func (c *cluster) origDst(dst interface{ String() string }) *endpoint {
	key := dst.String()
	c.epMu.Lock()
	defer c.epMu.Unlock()
	if e := c.byKey[key]; e != nil {
		return e
	}
	e := &endpoint{addr: key}
	if len(c.byKey) < 4096 { // bound the cache; beyond it endpoints are transient
		c.byKey[key] = e
	}
	return e
}
