package l7

import (
	"io"
	"math/rand/v2"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/mtls"
)

// accessLogger writes one JSON object per request (sampled), in the spirit
// of Envoy's JSON access log: fixed keys, response flags, no allocation-heavy
// encoder on the request path.
type accessLogger struct {
	enabled bool
	rate    float64
	mu      sync.Mutex
	w       io.Writer
}

func newAccessLogger(cfg config.AccessLog, w io.Writer) *accessLogger {
	rate := 1.0
	if cfg.SampleRate != nil {
		rate = *cfg.SampleRate
	}
	return &accessLogger{enabled: cfg.Enabled, rate: rate, w: w}
}

var logBufs = sync.Pool{New: func() any { b := make([]byte, 0, 512); return &b }}

func (l *accessLogger) log(r *http.Request, st *reqState, dir l4.Direction, status int, grpcStatus string, bytes int64, d time.Duration, start time.Time) {
	if !l.enabled || l.rate <= 0 || l.rate < 1 && rand.Float64() >= l.rate {
		return
	}
	bp := logBufs.Get().(*[]byte)
	b := (*bp)[:0]
	b = append(b, `{"time":`...)
	b = strconv.AppendQuote(b, start.UTC().Format(time.RFC3339Nano))
	b = append(b, `,"direction":"`...)
	b = append(b, dir.String()...)
	b = append(b, `","protocol":`...)
	b = strconv.AppendQuote(b, r.Proto)
	b = append(b, `,"method":`...)
	b = strconv.AppendQuote(b, r.Method)
	b = append(b, `,"authority":`...)
	b = strconv.AppendQuote(b, r.Host)
	b = append(b, `,"path":`...)
	b = strconv.AppendQuote(b, r.URL.RequestURI())
	b = append(b, `,"status":`...)
	b = strconv.AppendInt(b, int64(status), 10)
	if grpcStatus != "" {
		b = append(b, `,"grpc_status":`...)
		b = strconv.AppendQuote(b, grpcStatus)
	}
	b = append(b, `,"duration_ms":`...)
	b = strconv.AppendFloat(b, float64(d.Microseconds())/1000, 'f', 3, 64)
	b = append(b, `,"bytes_sent":`...)
	b = strconv.AppendInt(b, bytes, 10)
	if st.route != nil {
		b = append(b, `,"route":`...)
		b = strconv.AppendQuote(b, st.route.Key)
	}
	if st.dest != nil {
		b = append(b, `,"cluster":`...)
		b = strconv.AppendQuote(b, st.dest.Name)
	}
	if st.upstream != "" {
		b = append(b, `,"upstream":`...)
		b = strconv.AppendQuote(b, st.upstream)
	}
	if st.attempts > 1 {
		b = append(b, `,"attempts":`...)
		b = strconv.AppendInt(b, int64(st.attempts), 10)
	}
	if st.flags != "" {
		b = append(b, `,"flags":`...)
		b = strconv.AppendQuote(b, st.flags)
	}
	if st.err != nil {
		b = append(b, `,"error":`...)
		b = strconv.AppendQuote(b, st.err.Error())
	}
	if id := r.Header["X-Request-Id"]; len(id) > 0 {
		b = append(b, `,"request_id":`...)
		b = strconv.AppendQuote(b, id[0])
	}
	if r.RemoteAddr != "" {
		b = append(b, `,"downstream":`...)
		b = strconv.AppendQuote(b, r.RemoteAddr)
	}
	if peer := mtls.PeerIdentity(r.TLS); peer != "" {
		// Envoy's %DOWNSTREAM_PEER_URI_SAN%: the verified caller.
		b = append(b, `,"downstream_peer_principal":`...)
		b = strconv.AppendQuote(b, peer)
	}
	b = append(b, "}\n"...)
	l.mu.Lock()
	_, _ = l.w.Write(b)
	l.mu.Unlock()
	*bp = b
	logBufs.Put(bp)
}
