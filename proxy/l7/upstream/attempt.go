package upstream

import (
	"context"
	"errors"
	"io"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"sync"
	"sync/atomic"
)

// Trace prepares the context of an attempt: on a TLS cluster the attempt
// then records the connection its transport uses, so that RoundTrip can
// tell a failure the server's TLS caused. ctx is returned as it is (and a
// nil *TLSAttempt) on a plain-text cluster.
func (c *Cluster) Trace(ctx context.Context) (context.Context, *TLSAttempt) {
	if c.tls == nil {
		return ctx, nil
	}
	ta := new(TLSAttempt)
	return c.tls.traced(ctx, ta), ta
}

// RoundTrip sends one attempt of req (its URL aimed at ep, its context
// from Trace, which gave ta) over the transport c chooses for it. A failure
// the server's TLS caused is a *ConnectError (see TLS.classify). The caller
// counted the attempt on ep (Begin) and reports its outcome (Record,
// ObserveRTT).
func (c *Cluster) RoundTrip(req *http.Request, ep *Endpoint, ta *TLSAttempt) (*http.Response, error) {
	resp, err := c.Transport(req).RoundTrip(req)
	if err != nil && ta != nil {
		err = c.tls.classify(ep.addr, err, ta, req.Context().Err() != nil)
	}
	return resp, err
}

// TracePending enforces maxPendingRequests: a request waiting for a
// connection counts as pending; one over the limit is cancelled.
func (c *Cluster) TracePending(ctx context.Context, cancel context.CancelCauseFunc) context.Context {
	var waiting atomic.Bool
	return httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		GetConn: func(string) {
			if c.pending.Add(1) > c.maxPend {
				c.pending.Add(-1)
				if c.m != nil {
					c.m.Overflow.WithLabelValues("pending").Inc()
				}
				cancel(ErrPendingFull)
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

// Classify names the outcome of an attempt for outlier detection: reqCtx
// is the downstream request's context (its end is not the endpoint's
// fault).
func Classify(reqCtx context.Context, resp *http.Response, err error) Outcome {
	if err != nil {
		var ce *ConnectError
		switch {
		case errors.As(err, &ce):
			return OutcomeConnect
		case reqCtx.Err() != nil, errors.Is(err, ErrPendingFull):
			return OutcomeLocal
		case errors.Is(err, ErrPerTryTimeout):
			return OutcomeGateway
		}
		return OutcomeGateway
	}
	switch s := resp.StatusCode; {
	case s == 502 || s == 503 || s == 504:
		return OutcomeGateway
	case s >= 500:
		return Outcome5xx
	}
	return OutcomeOK
}

// Track wraps the body of a response to an attempt on ep so that its end
// (EOF, error or Close) releases the attempt once: ep's in-flight count
// (End), the attempt's context (cancel) and c's circuit breaker slot
// (Release).
func (c *Cluster) Track(body io.ReadCloser, ep *Endpoint, cancel context.CancelCauseFunc) io.ReadCloser {
	return &trackedBody{ReadCloser: body, ep: ep, cl: c, cancel: cancel}
}

// trackedBody releases the attempt once when the response body is
// finished: the endpoint's in-flight count, the attempt's context and the
// cluster's circuit breaker slot. (Fields, not a closure: one allocation.)
type trackedBody struct {
	io.ReadCloser
	once   sync.Once
	ep     *Endpoint
	cl     *Cluster
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

// origDest returns the endpoint for an original destination.
func (c *Cluster) origDest(dst netip.AddrPort) *Endpoint {
	key := dst.String()
	c.epMu.Lock()
	defer c.epMu.Unlock()
	if e := c.byKey[key]; e != nil {
		return e
	}
	e := &Endpoint{addr: key}
	if len(c.byKey) < 4096 { // bound the cache; beyond it endpoints are transient
		c.byKey[key] = e
	}
	return e
}
