// Package l7 is meshlet's HTTP-aware traffic management: a connection handler
// for the proxy's capture listeners that serves HTTP/1.1 (keep-alive,
// chunked, upgrades), h2c / HTTP/2 with prior knowledge and gRPC, routes
// requests by host, path, method and headers to weighted clusters of
// endpoints, and applies timeouts, retries, circuit breaking, outlier
// detection, active health checks, fault injection and mirroring. Common
// HTTP/1.1 requests are parsed by the engine's own codec (h1server.go, with
// the parser of package h1) and sent upstream by its own client (package
// upstream's fast path); everything else (HTTP/2, upgrades, streamed
// bodies, malformed input) by net/http. Routing lives in package route,
// clusters and everything towards the endpoints in package upstream.
//
// # Configuration at run time
//
// New compiles a config.L7 (package proxy/config holds the schema and its
// validation) into an immutable table of services, routes, clusters and
// endpoints. The engine holds the table behind an atomic pointer, and three
// methods replace it while traffic flows, without a hot restart:
//
//	func (e *Engine) Update(cfg config.L7) error
//	func (e *Engine) UpdateShared(cfg config.L7) error
//	func (e *Engine) UpdateEndpoints(cluster string, endpoints []config.Endpoint) error
//
// Update validates the whole configuration (config.L7.ValidateDynamic),
// compiles it and swaps it in; on error the running table stays and the
// error names every bad field and value. Requests in flight finish on the
// table they started with, new requests take the new one, and no downstream
// connection is closed. Clusters whose settings are unchanged apart from
// their static endpoints are carried over with their upstream pools,
// balancer, outlier-detection and health state. A route may name a cluster
// the configuration does not define (a control plane may send routes before
// clusters): such requests are answered 503 with response flag NC.
// UpdateShared is Update for a caller that never edits a configuration it
// handed over (the xDS client): what is the same memory as in the running
// configuration is neither validated nor compiled again. UpdateEndpoints
// replaces one cluster's endpoints only (the cheap path for endpoint
// churn). Limits and detection configure the downstream servers
// and change only with a new proxy generation.
package l7

import (
	"context"
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/identity"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/l7/upstream"
	"github.com/meshlet/meshlet/proxy/mtls"
	"github.com/meshlet/meshlet/proxy/sniff"
	"github.com/meshlet/meshlet/proxy/stats"
)

// Options are the proxy's dependencies. Zero values mean defaults.
type Options struct {
	// Dial connects to upstreams (default: net.Dialer). The proxy passes one
	// that binds inbound connections to 127.0.0.6.
	Dial DialFunc
	// Resolver resolves DNS clusters (default net.DefaultResolver, the
	// system resolver).
	Resolver Resolver
	// AccessLog receives one JSON line per logged request (default os.Stdout).
	AccessLog io.Writer
	// Logger for errors (default slog.Default()).
	Logger *slog.Logger
	// TCP handles connections detected as opaque TCP or on tcp ports; the
	// proxy passes its L4 relay. Default: a plain bidirectional copy to dst.
	TCP func(ctx context.Context, c net.Conn, dst netip.AddrPort, dir l4.Direction)
	// Identity is the workload identity for mutual TLS: outbound to
	// clusters of tls.mode ISTIO_MUTUAL, inbound on ports whose
	// PeerAuthentication (config.InboundPolicy.MTLS) is STRICT or
	// PERMISSIVE. Default: an empty identity (every mutual TLS handshake
	// fails; PERMISSIVE ports serve plain text).
	Identity mtls.Identity
	// Stats holds the engine's counters; the proxy passes the region it
	// shares with the other generations, so they never reset. Default: a
	// private region.
	Stats *stats.Region

	// netHTTPOnly serves every connection with net/http's server, without
	// the HTTP/1.1 codec (h1server.go); tests compare the two.
	netHTTPOnly bool
	// clock replaces time.Now for outlier ejection intervals (tests).
	clock func() time.Time
}

// Engine is the L7 engine. It is safe for concurrent use.
type Engine struct {
	// lim and detection are fixed for the engine's life (the downstream
	// servers and the detector are built from them); Update refuses to
	// change them.
	lim       config.Limits
	detection config.Detection
	opts      Options
	log       *slog.Logger
	dirs      [2]*dirServer // indexed by Direction
	rp        *httputil.ReverseProxy
	detector  *sniff.Detector
	m         *metrics

	// tab is the compiled route/cluster table requests start on (see
	// Update); updMu serializes Update and UpdateEndpoints.
	tab     atomic.Pointer[table]
	updMu   sync.Mutex
	retired []*upstream.Cluster // clusters replaced by an Update, closed by Close

	dial        atomic.Pointer[DialFunc]
	dialFromOpt bool

	bg       context.Context // background work (DNS, health checks); ends in Close
	bgCancel context.CancelFunc
	bgWG     sync.WaitGroup
	hijacked sync.Map // *trackedConn → struct{} (upgraded connections)

	h2 h2state // the HTTP/2 frame forwarder (h2proxy.go)

	identity mtls.Identity
	inbound  *mtls.Inbound // inbound mutual TLS (meshtls.go)
}

// dirServer is the HTTP server of one direction, so that a shutdown drain
// can stop inbound while outbound keeps serving.
type dirServer struct {
	srv      *http.Server
	ln       *connListener
	conns    sync.WaitGroup
	draining atomic.Bool
	closed   atomic.Bool // Close was called: connections are refused
	once     sync.Once
	drained  chan struct{} // closed when Shutdown returned

	h1mu sync.Mutex
	h1   map[*h1ServerConn]struct{} // connections served by the HTTP/1.1 codec
}

var _ http.RoundTripper = (*router)(nil)

// New validates cfg and builds the engine. Background work (DNS refresh,
// health checks) starts here and stops in Close / at the end of Drain.
// Update replaces the route/cluster table later.
func New(cfg config.L7, opts Options) (*Engine, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	dialFromOpt := opts.Dial != nil
	if opts.Dial == nil {
		d := &net.Dialer{KeepAlive: 30 * time.Second}
		opts.Dial = func(ctx context.Context, _ l4.Direction, network, addr string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		}
	}
	if opts.Resolver == nil {
		opts.Resolver = net.DefaultResolver
	}
	if opts.AccessLog == nil {
		opts.AccessLog = os.Stdout
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if opts.Stats == nil {
		opts.Stats = stats.NewPrivate()
	}
	p := &Engine{lim: cfg.Limits, detection: cfg.Detection, opts: opts, log: opts.Logger, m: newMetrics(opts.Stats)}
	p.dialFromOpt = dialFromOpt
	if opts.Identity == nil {
		opts.Identity = &identity.Store{}
		p.opts.Identity = opts.Identity
	}
	p.identity = opts.Identity
	p.inbound = mtls.NewInbound(p.identity, cfg.Detection.Timeout.D, opts.Stats)
	p.dial.Store(&opts.Dial)
	p.detector = sniff.NewDetector(sniff.Options{Timeout: cfg.Detection.Timeout.D, Stats: opts.Stats})
	p.bg, p.bgCancel = context.WithCancel(context.Background())
	t, fresh, err := p.compile(cfg, nil, false)
	if err != nil {
		p.bgCancel()
		return nil, err
	}
	p.tab.Store(t)
	p.m.keepRoutes()

	p.initH2()
	p.rp = &httputil.ReverseProxy{
		Rewrite: func(pr *httputil.ProxyRequest) {
			pr.Out.URL.Scheme = "http"
			pr.Out.URL.Host = pr.In.Host
			// The query as the client sent it (Rewrite mode would re-encode
			// one holding a semicolon, dropping parameters).
			pr.Out.URL.RawQuery = pr.In.URL.RawQuery
			// A sidecar is transparent to forwarding headers: what an
			// ingress or the client set reaches the app (ReverseProxy's
			// Rewrite mode would drop them).
			for _, k := range forwardingHeaders {
				if v, ok := pr.In.Header[k]; ok {
					pr.Out.Header[k] = v
				}
			}
		},
		Transport:      &router{p: p},
		ErrorHandler:   p.errorHandler,
		ModifyResponse: modifyResponse,
		ErrorLog:       slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
		BufferPool:     bufPool{},
	}
	var protos http.Protocols
	protos.SetHTTP1(true)
	protos.SetUnencryptedHTTP2(true)
	lim := p.lim
	newSrv := func() *http.Server {
		return &http.Server{
			Handler:           p,
			Protocols:         &protos,
			MaxHeaderBytes:    orInt(lim.MaxHeaderBytes, 64<<10),
			ReadHeaderTimeout: orDur(lim.ReadHeaderTimeout.D, 10*time.Second),
			IdleTimeout:       orDur(lim.IdleTimeout.D, 5*time.Minute),
			ErrorLog:          slog.NewLogLogger(p.log.Handler(), slog.LevelDebug),
			HTTP2: &http.HTTP2Config{
				MaxConcurrentStreams: int(orU32(lim.MaxConcurrentStreams, 250)),
				MaxReadFrameSize:     1 << 20,
			},
			ConnContext: func(ctx context.Context, c net.Conn) context.Context {
				if tc, ok := c.(*trackedConn); ok {
					return context.WithValue(ctx, connKey{}, tc)
				}
				return ctx
			},
			ConnState: func(c net.Conn, st http.ConnState) {
				tc, ok := c.(*trackedConn)
				if !ok {
					return
				}
				switch st {
				case http.StateClosed:
					tc.finish()
				case http.StateHijacked:
					tc.hijacked.Store(true)
				}
			},
		}
	}
	for i := range p.dirs {
		d := &dirServer{srv: newSrv(), ln: newConnListener(), drained: make(chan struct{})}
		p.dirs[i] = d
		go func() { _ = d.srv.Serve(d.ln) }()
	}

	p.startBackground(fresh)
	return p, nil
}

// startBackground starts the DNS refresh and health checks of clusters
// and waits for the first resolution of their names, so the first requests
// have endpoints; a failure is logged, not fatal (the name may appear
// later).
func (p *Engine) startBackground(clusters []*upstream.Cluster) {
	var ready []<-chan error
	for _, c := range clusters {
		if ch := c.Start(p.bg, &p.bgWG, p.opts.Resolver, p.dialUpstream); ch != nil {
			ready = append(ready, ch)
		}
	}
	for _, ch := range ready {
		if err := <-ch; err != nil {
			p.log.Warn("dns cluster not resolved yet", "err", err)
		}
	}
}

// Close stops background work and closes every connection at once. Use
// Drain for a graceful stop.
func (p *Engine) Close() error {
	p.bgCancel()
	var err error
	for _, d := range p.dirs {
		d.draining.Store(true)
		d.closed.Store(true)
		if cerr := d.srv.Close(); err == nil {
			err = cerr
		}
		d.eachH1(func(c *h1ServerConn) { _ = c.tc.Conn.Close() })
	}
	p.hijacked.Range(func(k, _ any) bool { k.(*trackedConn).Conn.Close(); return true })
	p.closeH2()
	p.bgWG.Wait()
	for _, c := range p.allClusters() {
		c.CloseIdle()
	}
	return err
}

// allClusters returns the clusters of the current table and those retired
// by updates.
func (p *Engine) allClusters() []*upstream.Cluster {
	p.updMu.Lock()
	defer p.updMu.Unlock()
	return append(p.tab.Load().allClusters(), p.retired...)
}

// Drain stops taking new requests gracefully and waits for in-flight ones:
// HTTP/1 connections close at their next response boundary (the response
// carries Connection: close; an idle connection stays open for its next
// request, since closing it races a request already on its way), HTTP/2
// connections get GOAWAY, upgraded connections run until they end. When ctx
// ends first, the remaining connections are closed and ctx's error returned.
func (p *Engine) Drain(ctx context.Context) error {
	p.StartDrain(l4.Inbound)
	p.StartDrain(l4.Outbound)
	var err error
	for _, d := range p.dirs {
		if werr := d.wait(ctx); err == nil {
			err = werr
		}
	}
	_ = p.Close()
	return err
}

// StartDrain begins draining one direction (idempotent) and returns at once:
// HTTP/1 connections move to the next generation between two requests
// (when the generation server has a successor) or close at their next
// response boundary, HTTP/2 connections get GOAWAY. A connection that
// reaches the engine afterwards (accepted before its listener closed) is
// served the same way, never dropped unanswered. The
// generation server's shutdown drain stops inbound first and outbound later.
func (p *Engine) StartDrain(dir l4.Direction) {
	d := p.dirs[dir]
	d.once.Do(func() {
		d.draining.Store(true)
		d.eachH1((*h1ServerConn).drainWake)
		p.drainH2(dir)
		go func() {
			// Shutdown's own wait has no deadline here: connections still open
			// when the caller's deadline passes are closed by Close (or by the
			// cancellation of ServeConn's ctx).
			_ = d.srv.Shutdown(context.Background())
			close(d.drained)
		}()
	})
}

// wait blocks until the direction's connections are gone or ctx ends.
func (d *dirServer) wait(ctx context.Context) error {
	done := make(chan struct{})
	go func() { d.conns.Wait(); <-d.drained; close(done) }()
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Protocol returns the protocol configured for a destination port (http,
// http2, grpc, tcp, or auto when it must be detected). The proxy uses it to
// decide which ports go to ServeConn.
func (p *Engine) Protocol(port uint16) string {
	if v, ok := p.tab.Load().portProto[port]; ok {
		return v
	}
	return config.ProtoAuto
}

// Collectors returns the engine's per-generation Prometheus collectors
// (request latency, endpoints per cluster). Its counters (requests,
// retries, breaker overflows, ejections, faults, protocol detection) are in
// Options.Stats.
func (p *Engine) Collectors() []prometheus.Collector {
	return p.m.collectors()
}

// ServeConn serves one accepted connection whose original destination is dst
// and returns when it is closed. Ports declared tcp go to Options.TCP; ports
// declared HTTP are served as HTTP/1.1 or HTTP/2 (by preface); other ports
// are detected from their first bytes.
func (p *Engine) ServeConn(ctx context.Context, c net.Conn, dst netip.AddrPort, dir l4.Direction) {
	proto := p.Protocol(dst.Port())
	if proto == config.ProtoTCP {
		p.serveTCP(ctx, c, dst, dir)
		return
	}
	var det *sniff.Result
	if proto == config.ProtoAuto {
		res, sc := p.detector.Detect(c)
		if res.Protocol == sniff.TCP {
			p.serveTCP(ctx, sc, dst, dir)
			return
		}
		c, det = sc, &res
	}
	if c, done := p.serveMaybeH2(ctx, c, det, dst, dir); !done {
		p.serveHTTP(ctx, c, dst, dir, nil)
	}
}

// serveHTTP serves an HTTP/1.1 or HTTP/2 (prior knowledge) connection until
// it closes or ctx ends: with the HTTP/1.1 codec while its requests are in
// the shape the codec takes, then (or at once, for HTTP/2) with net/http.
// mv, when not nil, lets the codec move the connection to the next
// generation when the direction drains.
func (p *Engine) serveHTTP(ctx context.Context, c net.Conn, dst netip.AddrPort, dir l4.Direction, mv *h1Mover) {
	d := p.dirs[dir]
	if d.closed.Load() {
		c.Close()
		return
	}
	// A draining direction still serves what reaches it: the connection was
	// accepted (or handed over) before the drain, and its client is sending
	// a request. Closing it would lose that request; the codec moves it to
	// the next generation or answers it with Connection: close.
	d.conns.Add(1)
	defer d.conns.Done()
	cs := mtls.ConnState(c)
	if !p.opts.netHTTPOnly {
		// The codec serves the connection, or hands it over (with the bytes
		// it read) when a request needs net/http.
		if c = p.serveH1(ctx, &trackedConn{Conn: c, dst: dst, dir: dir, tls: cs, mv: mv}, d); c == nil {
			return
		}
	}
	tc := &trackedConn{Conn: c, dst: dst, dir: dir, tls: cs, done: make(chan struct{})}
	if !d.ln.push(tc) {
		c.Close()
		return
	}
	select {
	case <-tc.done:
	case <-ctx.Done():
		c.Close()
		<-tc.done
	}
}

func (p *Engine) serveTCP(ctx context.Context, c net.Conn, dst netip.AddrPort, dir l4.Direction) {
	if p.opts.TCP != nil {
		p.opts.TCP(ctx, c, dst, dir)
		return
	}
	defer c.Close()
	up, err := p.dialUpstream(ctx, dir, "tcp", dst.String())
	if err != nil {
		return
	}
	defer up.Close()
	errc := make(chan error, 2)
	cp := func(dst, src net.Conn) {
		_, err := io.Copy(dst, src)
		if r, ok := dst.(interface{ Raw() net.Conn }); ok {
			dst = r.Raw() // a sniffed connection: half-close the socket under it
		}
		if cw, ok := dst.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
		errc <- err
	}
	go cp(up, c)
	go cp(c, up)
	_, _ = <-errc, <-errc // either direction's error ends only that direction
}

func (p *Engine) dialUpstream(ctx context.Context, dir l4.Direction, network, addr string) (net.Conn, error) {
	return (*p.dial.Load())(ctx, dir, network, addr)
}

// trackedConn is a downstream connection handed to the HTTP server.
type trackedConn struct {
	net.Conn
	dst      netip.AddrPort
	dir      l4.Direction
	tls      *tls.ConnectionState // inbound mutual TLS (nil: plain text)
	mv       *h1Mover             // the codec may move the connection (nil: it may not)
	done     chan struct{}
	once     sync.Once
	hijacked atomic.Bool
}

func (c *trackedConn) finish() { c.once.Do(func() { close(c.done) }) }

type connKey struct{}

// connListener feeds ServeConn's connections to http.Server.Serve.
type connListener struct {
	ch     chan net.Conn
	closed chan struct{}
	once   sync.Once
}

func newConnListener() *connListener {
	return &connListener{ch: make(chan net.Conn), closed: make(chan struct{})}
}

func (l *connListener) push(c net.Conn) bool {
	select {
	case l.ch <- c:
		return true
	case <-l.closed:
		return false
	}
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.closed:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

func (l *connListener) Addr() net.Addr { return &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1)} }

func orInt(v, d int) int {
	if v == 0 {
		return d
	}
	return v
}

func orU32(v, d uint32) uint32 {
	if v == 0 {
		return d
	}
	return v
}

func orDur(v, d time.Duration) time.Duration {
	if v == 0 {
		return d
	}
	return v
}

// forwardingHeaders are passed through unchanged.
var forwardingHeaders = []string{"Forwarded", "X-Forwarded-For", "X-Forwarded-Host", "X-Forwarded-Proto"}

// bufPool gives ReverseProxy pooled copy buffers.
type bufPool struct{}

var copyBufs = sync.Pool{New: func() any { b := make([]byte, 32<<10); return &b }}

// bufHolders recycles the *[]byte boxes, so Get and Put allocate nothing in
// steady state (Put(&b) would allocate a new box per request).
var bufHolders = sync.Pool{New: func() any { return new([]byte) }}

func (bufPool) Get() []byte {
	bp := copyBufs.Get().(*[]byte)
	b := *bp
	*bp = nil
	bufHolders.Put(bp)
	return b
}

func (bufPool) Put(b []byte) {
	bp := bufHolders.Get().(*[]byte)
	*bp = b
	copyBufs.Put(bp)
}
