package l7

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7/grpcwire"
	"github.com/meshlet/meshlet/proxy/l7/route"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
)

// reqState travels with a request through ReverseProxy to the router.
type reqState struct {
	tab      *table // the table the request started on
	route    *route.Route
	dest     *route.Destination
	retry    *route.RetryPolicy
	dst      netip.AddrPort
	upstream string
	attempts int
	flags    string // Envoy-style response flags for the access log
	err      error
	deadline time.Time
	grpc     bool
	bodyErr  atomic.Bool // a downstream request body read failed (not EOF)

	// Allocated with the state (one allocation per request, not three).
	rw   responseWriter
	body downstreamBody
}

// pastDeadline reports whether the request's deadline has passed: an
// upstream that reset the stream then did so because of the deadline it
// was given (grpc-timeout), possibly an instant before the proxy's own
// timer fired, and the answer is a timeout, not a reset.
func (st *reqState) pastDeadline() bool {
	return !st.deadline.IsZero() && !time.Now().Before(st.deadline)
}

// downstreamBody records request body read errors (malformed chunking,
// client reset) to tell downstream faults from upstream ones.
type downstreamBody struct {
	io.ReadCloser
	st *reqState
}

func (b *downstreamBody) Read(p []byte) (int, error) {
	n, err := b.ReadCloser.Read(p)
	if err != nil && err != io.EOF {
		b.st.bodyErr.Store(true)
	}
	return n, err
}

type stateKey struct{}

// ServeHTTP routes one downstream request.
func (p *Engine) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	start := time.Now()
	tc, _ := r.Context().Value(connKey{}).(*trackedConn)
	var dst netip.AddrPort
	dir := l4.Outbound
	if tc != nil {
		dst, dir = tc.dst, tc.dir
		if r.TLS == nil {
			r.TLS = tc.tls
		}
		defer func() {
			if tc.hijacked.Load() {
				// An upgraded connection (WebSocket) ended with its handler.
				p.hijacked.Delete(tc)
				tc.finish()
			}
		}()
	}
	t := p.tab.Load()
	if tc != nil && p.refusePlaintext(t, dir, r.TLS, dst) {
		// No answer: an HTTP/1.1 connection closes (net/http and the
		// codec's serve treat ErrAbortHandler so); HTTP/2 that net/http
		// serves has the stream reset.
		panic(http.ErrAbortHandler)
	}
	ensureRequestID(r.Header)
	st := &reqState{tab: t, dst: dst, grpc: grpcwire.IsGRPC(r)}
	st.rw.ResponseWriter = w
	rw := &st.rw

	host := route.HostOnly(r.Host)
	rt := t.match(r, host, dir, dst)
	dc := p.decide(rt, r, st.grpc, dst)
	st.route, st.dest, st.retry, st.flags = dc.route, dc.dest, dc.retry, dc.flags
	if dc.delay > 0 {
		t := time.NewTimer(dc.delay)
		select {
		case <-t.C:
		case <-r.Context().Done():
			t.Stop()
		}
	}
	if a := dc.reply; a != nil {
		p.localAnswer(rw, r, a)
		p.finish(rw, r, st, dir, start)
		return
	}
	ctx := r.Context()
	if dc.timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeoutCause(ctx, dc.timeout, errRouteTimeout)
		defer cancel()
		st.deadline = time.Now().Add(dc.timeout)
	}
	cfg := rt.Config
	if cfg.Rewrite != nil {
		r = r.Clone(ctx)
	}
	dc.prepare(r, host)
	if rt.Mirror != nil && hit(orPct(cfg.Mirror.Percent)) {
		r = p.mirror(r, rt)
	}
	if r.Body != nil && r.Body != http.NoBody {
		// Remember a downstream body error so it is answered 400, not 502.
		st.body = downstreamBody{ReadCloser: r.Body, st: st}
		r.Body = &st.body
	}
	ctx = context.WithValue(ctx, stateKey{}, st)
	if tc != nil && isUpgrade(r) {
		p.hijacked.Store(tc, struct{}{})
	}
	defer func() {
		// ReverseProxy aborts a response that fails mid-body with
		// http.ErrAbortHandler; still log and count it, then re-panic so the
		// server resets the stream/connection.
		if v := recover(); v != nil {
			st.flags = addFlag(st.flags, "UPE")
			p.finish(rw, r, st, dir, start)
			panic(v)
		}
	}()
	p.rp.ServeHTTP(rw, r.WithContext(ctx))
	p.finish(rw, r, st, dir, start)
}

// newRequestID returns a random (version 4) UUID for x-request-id.
func newRequestID() string {
	var b [36]byte
	hi, lo := rand.Uint64(), rand.Uint64()
	hi = hi&^(0xf<<12) | 4<<12   // version 4
	lo = lo&^(0x3<<62) | 0x2<<62 // RFC 9562 variant
	const hexd = "0123456789abcdef"
	j := 0
	for i := 0; i < 16; i++ {
		if i == 4 || i == 6 || i == 8 || i == 10 {
			b[j] = '-'
			j++
		}
		var v byte
		if i < 8 {
			v = byte(hi >> (56 - 8*i))
		} else {
			v = byte(lo >> (56 - 8*(i-8)))
		}
		b[j], b[j+1] = hexd[v>>4], hexd[v&0xf]
		j += 2
	}
	return string(b[:])
}

func orPct(v float64) float64 {
	if v == 0 {
		return 100
	}
	return v
}

func hit(percent float64) bool {
	return percent >= 100 || percent > 0 && rand.Float64()*100 < percent
}

func addFlag(flags, f string) string {
	if flags == "" {
		return f
	}
	return flags + "," + f
}

func isUpgrade(r *http.Request) bool {
	return r.Header.Get("Upgrade") != "" && r.ProtoMajor == 1
}

// mirror sends a copy of r to the route's mirror cluster, fire and forget.
// Bodies are mirrored only when small enough to buffer.
func (p *Engine) mirror(r *http.Request, rt *route.Route) *http.Request {
	var body []byte
	if r.Body != nil && r.Body != http.NoBody {
		if r.ContentLength < 0 || r.ContentLength > route.DefaultMaxReplayBody {
			return r // streaming or large: not mirrored
		}
		b, err := io.ReadAll(io.LimitReader(r.Body, r.ContentLength))
		if err != nil {
			return r
		}
		body = b
		r = r.Clone(r.Context())
		r.Body = io.NopCloser(bytes.NewReader(b))
	}
	m := rt.Config.Mirror
	shadow := r.Clone(context.Background())
	shadow.Host = route.HostOnly(r.Host) + "-shadow"
	if _, port, ok := strings.Cut(r.Host, ":"); ok {
		shadow.Host += ":" + port
	}
	shadow.RequestURI = ""
	shadow.URL.Scheme = "http"
	if body != nil {
		shadow.Body = io.NopCloser(bytes.NewReader(body))
	} else {
		shadow.Body = http.NoBody
	}
	removeHopHeaders(shadow.Header)
	cl := rt.Mirror
	p.m.cluster(cl.Name()).Mirrored.Inc()
	go func() { //nolint:gosec // G118: the mirrored request must not end with the original one
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		st := &reqState{dest: &route.Destination{Cluster: cl, Name: cl.Name(), Subset: m.Subset}}
		resp, err := (&router{p: p}).RoundTrip(shadow.WithContext(context.WithValue(ctx, stateKey{}, st)))
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
	}()
	return r
}

func removeHopHeaders(h http.Header) {
	for _, k := range []string{"Connection", "Proxy-Connection", "Keep-Alive", "Te", "Trailer", "Transfer-Encoding", "Upgrade"} {
		h.Del(k)
	}
}

// localAnswer writes a decision's local answer.
func (p *Engine) localAnswer(w *responseWriter, r *http.Request, a *localAnswer) {
	if a.exact && !grpcwire.IsGRPC(r) {
		h := w.Header()
		h.Set("Content-Type", "text/plain")
		h.Set("Content-Length", strconv.Itoa(len(a.msg)))
		w.WriteHeader(a.status)
		_, _ = io.WriteString(w, a.msg)
		return
	}
	p.localReply(w, r, a.status, a.grpcCode, a.msg)
}

// localReply answers without an upstream: HTTP status for HTTP, a
// trailers-only gRPC status for gRPC (HTTP 200, like Envoy).
func (p *Engine) localReply(w *responseWriter, r *http.Request, status, grpcCode int, msg string) {
	if grpcwire.IsGRPC(r) {
		h := w.Header()
		h.Set("Content-Type", "application/grpc")
		h.Set("Grpc-Status", strconv.Itoa(grpcCode))
		h.Set("Grpc-Message", msg)
		w.WriteHeader(http.StatusOK)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/plain; charset=utf-8")
	h.Set("X-Content-Type-Options", "nosniff")
	w.WriteHeader(status)
	_, _ = io.WriteString(w, msg+"\n")
}

// errorHandler maps a failed forward to a local reply (before any response
// byte was sent) and a response flag.
func (p *Engine) errorHandler(w http.ResponseWriter, r *http.Request, err error) {
	st, _ := r.Context().Value(stateKey{}).(*reqState)
	rw, _ := w.(*responseWriter)
	status, code, flag, msg := http.StatusBadGateway, 14, "UC", "upstream connection reset"
	var ce *upstream.ConnectError
	switch {
	case st != nil && st.bodyErr.Load():
		status, code, flag, msg = http.StatusBadRequest, 13, "DPE", "malformed request body"
	case errors.Is(err, upstream.ErrOverflow), errors.Is(err, upstream.ErrPendingFull):
		status, code, flag, msg = http.StatusServiceUnavailable, 14, "UO", err.Error()
		w.Header().Set("X-Meshlet-Overflow", "true")
	case errors.Is(err, upstream.ErrNoEndpoint):
		status, code, flag, msg = http.StatusServiceUnavailable, 14, "UH", err.Error()
	case errors.Is(context.Cause(r.Context()), errRouteTimeout), errors.Is(err, errRouteTimeout), errors.Is(err, upstream.ErrPerTryTimeout),
		st != nil && st.pastDeadline():
		status, code, flag, msg = http.StatusGatewayTimeout, 4, "UT", "upstream request timeout"
	case errors.As(err, &ce):
		status, code, flag, msg = http.StatusServiceUnavailable, 14, "UF", "upstream connect error"
	case r.Context().Err() != nil:
		status, code, flag, msg = 499, 1, "DC", "downstream disconnected"
	}
	if st != nil {
		st.flags = addFlag(st.flags, flag)
		st.err = err
	}
	if rw == nil {
		rw = &responseWriter{ResponseWriter: w}
	}
	if rw.wroteHeader {
		return
	}
	if status == 499 {
		rw.status = 499
		return
	}
	p.localReply(rw, r, status, code, msg)
}

func modifyResponse(resp *http.Response) error {
	st, _ := resp.Request.Context().Value(stateKey{}).(*reqState)
	if st == nil || st.route == nil {
		return nil
	}
	if h := st.route.Config.Headers; h != nil {
		route.ApplyHeaderOps(resp.Header, &h.Response)
	}
	return nil
}

// responseWriter records what was sent for logs and metrics. Unwrap keeps
// http.ResponseController (flush, hijack, full duplex) working.
type responseWriter struct {
	http.ResponseWriter
	status      int
	bytes       int64
	wroteHeader bool
}

func (w *responseWriter) WriteHeader(code int) {
	if !w.wroteHeader && code >= 200 {
		w.status = code
		w.wroteHeader = true
	} else if code == http.StatusSwitchingProtocols {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *responseWriter) Write(b []byte) (int, error) {
	if !w.wroteHeader {
		w.status, w.wroteHeader = http.StatusOK, true
	}
	n, err := w.ResponseWriter.Write(b)
	w.bytes += int64(n)
	return n, err
}

func (w *responseWriter) Flush() { _ = http.NewResponseController(w.ResponseWriter).Flush() }

func (w *responseWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

func (p *Engine) finish(w *responseWriter, r *http.Request, st *reqState, dir l4.Direction, start time.Time) {
	d := time.Since(start)
	status := w.status
	if status == 0 {
		status = 499
		if w.wroteHeader {
			status = http.StatusOK
		}
	}
	cl := st.metricsCluster()
	var gs string
	if st.grpc {
		gs = grpcwire.Status(w.Header())
	}
	if st.route != nil {
		if rm := st.route.Metrics[cl]; rm != nil {
			rm.Observe(status, d)
		}
	} else {
		p.m.noRoute.Inc()
	}
	st.tab.alog.log(r, st, dir, status, gs, w.bytes, d, start)
}
