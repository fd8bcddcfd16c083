package l7

import (
	"context"
	"errors"
	"github.com/meshlet/meshlet/proxy/l7/grpcwire"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
	"io"
	"net/http"
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
	cl := st.dest.Cluster
	if !cl.Admit() { // circuit breaker: concurrent requests
		return nil, upstream.ErrOverflow
	}

	rp := st.retry
	var body *replayBody
	if rp != nil && rp.Attempts > 0 && req.Body != nil && req.Body != http.NoBody {
		body = newReplayBody(req.Body, rp.MaxBody)
	}
	var last *upstream.Endpoint
	for attempt := 0; ; attempt++ {
		ep := cl.Pick(st.dest.Subset, st.dst, last)
		if ep == nil {
			cl.Release() // the circuit breaker slot
			return nil, upstream.ErrNoEndpoint
		}
		last = ep
		st.upstream = ep.Addr()
		st.attempts = attempt + 1

		// An attempt needs its own cancelable context only when something
		// cancels it (per-try timeout, pending limit); otherwise the request's
		// context serves, saving a context, a closure and its cancel per request.
		ctx, cancel := req.Context(), noCancel
		if (rp != nil && rp.PerTry > 0) || cl.LimitsPending() {
			ctx, cancel = context.WithCancelCause(req.Context())
		}
		var perTry *time.Timer
		if rp != nil && rp.PerTry > 0 {
			perTry = time.AfterFunc(rp.PerTry, func() { cancel(upstream.ErrPerTryTimeout) })
		}
		if cl.LimitsPending() {
			ctx = cl.TracePending(ctx, cancel)
		}
		ctx, ta := cl.Trace(ctx)
		// One shallow copy of req carrying the attempt's context (and URL).
		out := req.WithContext(ctx)
		u := *req.URL
		u.Host = ep.Addr()
		u.Scheme = cl.Scheme()
		out.URL = &u
		if body != nil {
			out.Body = body.attempt()
		}
		if st.grpc && !st.deadline.IsZero() {
			// Propagate the remaining deadline to the upstream.
			h := out.Header.Clone()
			h.Set("Grpc-Timeout", grpcwire.FormatTimeout(time.Until(st.deadline)))
			out.Header = h
		}

		ep.Begin()
		t0 := time.Now()
		resp, err := cl.RoundTrip(out, ep, ta)
		if perTry != nil {
			perTry.Stop()
		}
		if err != nil {
			if c := context.Cause(ctx); c != nil && (errors.Is(c, upstream.ErrPerTryTimeout) || errors.Is(c, upstream.ErrPendingFull)) && !errors.Is(err, c) {
				err = errors.Join(c, err)
			}
		}
		o := upstream.Classify(req.Context(), resp, err)
		if o.Measured() {
			ep.ObserveRTT(time.Since(t0), time.Now())
		}
		cl.Record(ep, o)

		if rp != nil && attempt < rp.Attempts && !errors.Is(err, upstream.ErrPendingFull) && req.Context().Err() == nil &&
			rp.Retriable(resp, err) && (body == nil || body.replayable()) {
			if st.route.Budget.Withdraw() {
				ep.End()
				if resp != nil {
					drainAndClose(resp.Body)
				}
				cancel(nil)
				cl.Metrics().Retries.Inc()
				select {
				case <-time.After(rp.Backoff(attempt)):
					continue
				case <-req.Context().Done():
					cl.Release() // the circuit breaker slot
					return nil, context.Cause(req.Context())
				}
			}
			cl.Metrics().RetryBudgetExhausted.Inc()
		}
		if err != nil {
			ep.End()
			cancel(nil)
			cl.Release() // the circuit breaker slot
			if body != nil {
				body.Close()
			}
			return nil, err
		}
		resp.Body = cl.Track(resp.Body, ep, cancel)
		return resp, nil
	}
}

func noCancel(error) {}

func drainAndClose(b io.ReadCloser) {
	_, _ = io.CopyN(io.Discard, b, 4<<10)
	b.Close()
}
