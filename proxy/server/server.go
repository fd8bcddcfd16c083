// Package server is one proxy generation: it serves the capture listeners
// (15001 outbound, 15006 inbound), the health endpoint (15021), Prometheus
// (15090) and the admin endpoint (15000, 127.0.0.1 only) on listening sockets
// it is given — inherited from the agent, which owns them for the life of
// the pod — and drains on request.
//
// Each accepted capture connection gets its original destination (package
// origdst) and is handed to the Handler the Options.Chooser picks (package
// l4 documents the seam; the default is the L4 passthrough). Draining closes
// only this process's copies of the listening sockets (close(2), never
// shutdown(2), so connections queued in the shared backlog wait for the next
// generation), tells every connection through l4.Conn.Draining, and returns
// when no connection is left or at the drain deadline.
package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
	"github.com/meshlet/meshlet/proxy/origdst"
	"github.com/meshlet/meshlet/proxy/stats"
)

// Listeners are the sockets a generation serves. Any may be nil/empty.
type Listeners struct {
	Outbound   []*net.TCPListener
	Inbound    []*net.TCPListener
	Health     *net.TCPListener
	Prometheus *net.TCPListener
	Admin      *net.TCPListener
}

// DrainMode selects how a generation drains.
type DrainMode int

const (
	// HotRestart means a newer generation serves every listener: stop accepting
	// on all of them and finish in-flight work.
	HotRestart DrainMode = iota
	// Shutdown means the pod is terminating: fail readiness, stop accepting
	// inbound, drain inbound connections, keep outbound working until the
	// deadline or until no connection is left.
	Shutdown
)

func (m DrainMode) String() string {
	if m == Shutdown {
		return "shutdown"
	}
	return "hot-restart"
}

// Options configure a generation. Zero values mean the documented default.
type Options struct {
	// Config is the loaded, validated configuration. Required.
	Config *config.Loaded
	// Listeners to serve.
	Listeners Listeners
	// Stats is the counter region (shared with other generations); nil:
	// a private one.
	Stats *stats.Region
	// Generation is this generation's number (1 for the first).
	Generation int
	// DrainDuration is the drain deadline; 0: 5s.
	DrainDuration time.Duration
	// Chooser picks a connection's handler; nil or a nil result: L4.
	Chooser l4.Chooser
	// Gatherer adds metrics (e.g. the L7 engine's) to /stats/prometheus.
	Gatherer prometheus.Gatherer
	// OrigDst finds a connection's original destination; nil: origdst.Get.
	OrigDst func(*net.TCPConn) (netip.AddrPort, error)
	// Handover, if set, is this generation's end of the hand-over socket
	// from its predecessor: established connections the predecessor moves
	// arrive there and are served here (see l4.Session).
	Handover *net.UnixConn
	// Version is reported in /server_info.
	Version string
	// Dynamic, when set, is the configuration the generation receives at
	// run time (the xDS client): /healthz/ready answers 503 until it is
	// ready, /server_info and /config_dump include it.
	Dynamic Dynamic
	// Certs, when set, is served as JSON on the admin listener's /certs
	// (the workload certificate, as Envoy's admin /certs shows it).
	Certs func() any
	// Log receives the generation's logs; nil: discard.
	Log *slog.Logger
}

// Dynamic is configuration received at run time, as the admin and health
// endpoints show it.
type Dynamic interface {
	// Ready returns nil once a complete configuration serves, else why not.
	Ready() error
	// Info is added to /server_info as "dynamic".
	Info() any
	// ConfigDump returns Envoy's admin.v3.ConfigDump JSON ({"configs":
	// [...]}); includeEDS adds the endpoints, as Envoy's ?include_eds.
	ConfigDump(includeEDS bool) ([]byte, error)
}

// Server is a running generation.
type Server struct {
	o       Options
	log     *slog.Logger
	fwd     *l4.Forwarder
	metrics [2]*l4.Metrics
	limits  [2]int
	started time.Time

	errOrigDst  *stats.Counter
	errOverflow [2]*stats.Counter
	errAccept   *stats.Counter
	errRefused  *stats.Counter

	// successor, once set by HandOver, takes the established connections.
	successor atomic.Pointer[l4.Sender]

	ctx      context.Context // cancelled at the drain deadline
	cancel   context.CancelFunc
	drainIn  chan struct{}
	drainOut chan struct{}
	draining atomic.Int32 // 0: serving, 1+DrainMode: draining
	drainMu  sync.Mutex
	closed   chan struct{} // closed when Wait may return

	conns    sync.WaitGroup
	inflight atomic.Int64 // accepted and not yet finished, both directions
	accepts  sync.WaitGroup
	https    []*http.Server

	afterAccept atomic.Pointer[func()] // test hook between accept(2) and counting the connection
}

// New prepares a generation; nothing is served until Start.
func New(o Options) (*Server, error) {
	if o.Config == nil {
		return nil, errors.New("server: Options.Config is required")
	}
	if o.Stats == nil {
		o.Stats = stats.NewPrivate()
	}
	if o.DrainDuration == 0 {
		o.DrainDuration = 5 * time.Second
	}
	if o.OrigDst == nil {
		o.OrigDst = origdst.Get
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	s := &Server{o: o, log: o.Log, started: time.Now(), drainIn: make(chan struct{}), drainOut: make(chan struct{}), closed: make(chan struct{})}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	r := o.Stats
	c := o.Config.Config
	s.metrics = [2]*l4.Metrics{l4.NewMetrics(r, l4.Inbound), l4.NewMetrics(r, l4.Outbound)}
	s.limits = [2]int{c.Inbound.MaxConnections, c.Outbound.MaxConnections}
	s.errOrigDst = r.Counter(`meshlet_proxy_errors_total{direction="any",kind="original_destination"}`)
	s.errAccept = r.Counter(`meshlet_proxy_errors_total{direction="any",kind="accept"}`)
	s.errRefused = r.Counter(`meshlet_proxy_errors_total{direction="any",kind="handover_refused"}`)
	for _, d := range []l4.Direction{l4.Inbound, l4.Outbound} {
		s.errOverflow[d] = r.Counter(fmt.Sprintf("meshlet_proxy_errors_total{direction=%q,kind=\"overflow\"}", d))
	}
	r.Counter(`meshlet_proxy_generations_started_total`).Inc()
	s.fwd = &l4.Forwarder{
		Options: [2]l4.DirectionOptions{
			l4.Inbound: {
				ConnectTimeout: c.Inbound.ConnectTimeout.Duration,
				IdleTimeout:    c.Inbound.IdleTimeout.Duration,
				SourceIPv4:     c.SourceIPv4(),
				SourceIPv6:     c.SourceIPv6(),
			},
			l4.Outbound: {
				ConnectTimeout: c.Outbound.ConnectTimeout.Duration,
				IdleTimeout:    c.Outbound.IdleTimeout.Duration,
			},
		},
		Metrics: s.metrics,
		Log:     o.Log,
	}
	return s, nil
}

// Forwarder returns the generation's L4 passthrough handler, for Choosers
// that fall back to it.
func (s *Server) Forwarder() *l4.Forwarder { return s.fwd }

// Start begins serving every listener.
func (s *Server) Start() {
	for _, ln := range s.o.Listeners.Inbound {
		s.acceptLoop(ln, l4.Inbound)
	}
	for _, ln := range s.o.Listeners.Outbound {
		s.acceptLoop(ln, l4.Outbound)
	}
	if s.o.Handover != nil {
		s.receive(s.o.Handover)
	}
	s.serveHTTP(s.o.Listeners.Health, s.healthMux())
	s.serveHTTP(s.o.Listeners.Prometheus, s.promMux())
	s.serveHTTP(s.o.Listeners.Admin, s.adminMux())
	s.log.Info("generation serving", "configHash", s.o.Config.Hash)
}

func (s *Server) serveHTTP(ln *net.TCPListener, h http.Handler) {
	if ln == nil {
		return
	}
	hs := &http.Server{Handler: h, ReadHeaderTimeout: 5 * time.Second, IdleTimeout: 30 * time.Second, ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelDebug)}
	s.https = append(s.https, hs)
	go func() { _ = hs.Serve(ln) }()
}

func (s *Server) acceptLoop(ln *net.TCPListener, dir l4.Direction) {
	s.accepts.Add(1)
	go func() {
		defer s.accepts.Done()
		backoff := time.Duration(0)
		for {
			c, err := ln.AcceptTCP()
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return
				}
				// Out of file descriptors or memory: wait and retry
				// rather than spin; queued connections stay in the
				// backlog.
				s.errAccept.Inc()
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accept failed", "direction", dir, "err", err, "retryIn", backoff)
				time.Sleep(backoff)
				continue
			}
			backoff = 0
			if f := s.afterAccept.Load(); f != nil {
				(*f)()
			}
			s.conns.Add(1)
			s.inflight.Add(1)
			go s.handle(c, dir)
		}
	}()
}

func (s *Server) handle(c *net.TCPConn, dir l4.Direction) {
	defer s.conns.Done()
	defer s.inflight.Add(-1)
	m := s.metrics[dir]
	m.Connections.Inc()
	active := m.Active.Add(1)
	defer m.Active.Add(-1)
	if lim := s.limits[dir]; lim > 0 && active > int64(lim) {
		s.errOverflow[dir].Inc()
		_ = c.SetLinger(0)
		_ = c.Close()
		return
	}
	defer c.Close()
	dst, err := s.o.OrigDst(c)
	if err == nil && isSelf(c, dst) {
		err = fmt.Errorf("original destination %s is the proxy listener itself", dst)
	}
	if err != nil {
		s.errOrigDst.Inc()
		s.log.Debug("no usable original destination", "direction", dir, "remote", c.RemoteAddr(), "err", err)
		_ = c.SetLinger(0)
		return
	}
	drain := s.drainIn
	if dir == l4.Outbound {
		drain = s.drainOut
	}
	conn := l4.NewConn(c, dir, dst, drain)
	conn.HandOver = s.successor.Load
	h := s.choose(conn)
	if h == nil {
		h = s.fwd
	}
	h.ServeConn(s.ctx, conn)
}

// choose returns the handler Options.Chooser picks for conn; nil: none
// (no Chooser, or it leaves conn to L4).
func (s *Server) choose(conn *l4.Conn) l4.Handler {
	if s.o.Chooser == nil {
		return nil
	}
	return s.o.Chooser(conn)
}

// receive greets the predecessor on c and serves every connection it hands
// over until it closes its end. The loop counts as one connection in flight,
// so a drain of this generation waits for what is still queued in c (and
// hands it on).
func (s *Server) receive(c *net.UnixConn) {
	rcv, err := l4.NewReceiver(c)
	if err != nil {
		s.log.Warn("hand-over socket unusable; established connections of the previous generation stay there", "err", err)
		_ = c.Close()
		return
	}
	s.inflight.Add(1)
	go func() {
		defer s.inflight.Add(-1)
		defer rcv.Close()
		for {
			sess, err := rcv.Receive()
			if errors.Is(err, l4.ErrMalformedSession) {
				s.log.Error("hand-over message dropped", "err", err)
				continue
			}
			if err != nil {
				if !errors.Is(err, io.EOF) {
					s.log.Warn("hand-over socket failed", "err", err)
				}
				return
			}
			s.conns.Add(1)
			s.inflight.Add(1)
			go s.adopt(sess)
		}
	}()
}

// adopt serves a connection handed over by the previous generation: it is
// counted active here, not as a new connection.
func (s *Server) adopt(sess *l4.Session) {
	defer s.conns.Done()
	defer s.inflight.Add(-1)
	m := s.metrics[sess.Direction]
	m.Adopted.Inc()
	m.Active.Add(1)
	defer m.Active.Add(-1)
	drain := s.drainIn
	if sess.Direction == l4.Outbound {
		drain = s.drainOut
	}
	conn := l4.NewConn(sess.Client, sess.Direction, sess.OrigDst, drain)
	conn.Accepted = sess.Accepted
	conn.HandOver = s.successor.Load
	if sess.HTTP1 {
		// An L7 connection between two requests: the handler the Chooser
		// picks serves it on; without one it is relayed as it is.
		defer sess.Close()
		conn.ResumedHTTP1, conn.Carried = true, sess.ToUpstream
		h := s.choose(conn)
		if h == nil {
			_ = s.fwd.Forward(s.ctx, conn, sess.ToUpstream)
			return
		}
		h.ServeConn(s.ctx, conn)
		return
	}
	_ = s.fwd.Resume(s.ctx, conn, sess)
}

// HandOver drains for a hot restart and moves every established L4
// connection to the successor listening on c (the other end of its
// Options.Handover). If the successor does not answer the greeting, the
// connections stay here until they end or the drain deadline, and the
// refusal is counted.
func (s *Server) HandOver(c *net.UnixConn) {
	snd, err := l4.NewSender(c, 2*time.Second)
	if err != nil {
		s.errRefused.Inc()
		s.log.Error("hand-over impossible; established connections stay until they end or the drain deadline", "err", err)
	} else if !s.successor.CompareAndSwap(nil, snd) {
		_ = snd.Close() // a hand-over is already under way
	}
	s.Drain(HotRestart)
}

func isSelf(c *net.TCPConn, dst netip.AddrPort) bool {
	la, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok {
		return false
	}
	return la.AddrPort().Port() == dst.Port() && la.AddrPort().Addr().Unmap() == dst.Addr().Unmap()
}

// Draining reports whether Drain was called.
func (s *Server) Draining() bool { return s.draining.Load() != 0 }

// Active returns the number of open connections by direction.
func (s *Server) Active() (inbound, outbound int64) {
	return s.metrics[l4.Inbound].Active.Load(), s.metrics[l4.Outbound].Active.Load()
}

// Drain starts draining in mode m; a second call may only widen a Shutdown
// drain into a HotRestart one. Wait returns when the drain is complete.
func (s *Server) Drain(m DrainMode) {
	s.drainMu.Lock()
	defer s.drainMu.Unlock()
	prev := s.draining.Load()
	if prev == int32(1+HotRestart) || prev == int32(1+m) {
		return
	}
	s.draining.Store(int32(1 + m))
	s.log.Info("generation draining", "mode", m, "deadline", s.o.DrainDuration)
	closeAll := func(lns []*net.TCPListener) {
		for _, ln := range lns {
			_ = ln.Close() // our copy only: close(2), never shutdown(2)
		}
	}
	if prev == 0 {
		closeAll(s.o.Listeners.Inbound)
		close(s.drainIn)
	}
	if m == HotRestart {
		closeAll(s.o.Listeners.Outbound)
		close(s.drainOut)
		for _, hs := range s.https {
			hs.SetKeepAlivesEnabled(false)
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			go func() { defer cancel(); _ = hs.Shutdown(ctx) }()
		}
	}
	if prev == 0 {
		go s.finish()
	}
}

// finish waits for the connections to end or the deadline, then releases
// Wait. In a hot-restart drain nothing new arrives, so zero connections is
// final; in a shutdown drain outbound still accepts, so zero must hold for a
// quiet second (or half the deadline, if shorter) before the generation
// goes.
func (s *Server) finish() {
	deadline := time.NewTimer(s.o.DrainDuration)
	defer deadline.Stop()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	quiet := min(time.Second, s.o.DrainDuration/2)
	var zeroSince time.Time
	// A connection accept(2) returned is counted in inflight a moment later,
	// on the accept goroutine; zero connections is final only once those
	// goroutines are gone (the drain closed their listeners). Without this
	// a connection accepted just before the drain — its goroutine descheduled
	// between accept and the count on a busy node — died with the generation.
	acceptsDone := make(chan struct{})
	acceptsWatch := sync.OnceFunc(func() { go func() { s.accepts.Wait(); close(acceptsDone) }() })
	for {
		if s.inflight.Load() == 0 {
			if zeroSince.IsZero() {
				zeroSince = time.Now()
			}
			if s.draining.Load() == int32(1+HotRestart) {
				acceptsWatch()
				select {
				case <-acceptsDone:
				default:
					zeroSince = time.Time{} // an accepted connection may not be counted yet
				}
				if !zeroSince.IsZero() && s.inflight.Load() == 0 {
					break
				}
			} else if time.Since(zeroSince) >= quiet {
				break
			}
		} else {
			zeroSince = time.Time{}
		}
		in, out := s.Active()
		select {
		case <-deadline.C:
			s.log.Info("drain deadline reached; closing connections", "inbound", in, "outbound", out)
			s.cancel()
			waitTimeout(&s.conns, time.Second)
			s.closeSuccessor()
			close(s.closed)
			return
		case <-tick.C:
		}
	}
	s.cancel()
	s.closeSuccessor()
	close(s.closed)
}

// closeSuccessor tells the successor that every connection has been sent.
func (s *Server) closeSuccessor() {
	if snd := s.successor.Load(); snd != nil {
		_ = snd.Close()
	}
}

func waitTimeout(wg *sync.WaitGroup, d time.Duration) {
	ch := make(chan struct{})
	go func() { wg.Wait(); close(ch) }()
	select {
	case <-ch:
	case <-time.After(d):
	}
}

// Wait blocks until a drain has completed.
func (s *Server) Wait() { <-s.closed }

// Close stops everything at once.
func (s *Server) Close() {
	s.Drain(HotRestart)
	s.cancel()
}

func (s *Server) state() string {
	switch s.draining.Load() {
	case 0:
		return "LIVE"
	default:
		return "DRAINING"
	}
}

func (s *Server) healthMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, _ *http.Request) {
		if s.Draining() {
			http.Error(w, "draining", http.StatusServiceUnavailable)
			return
		}
		if d := s.o.Dynamic; d != nil {
			if err := d.Ready(); err != nil {
				http.Error(w, err.Error(), http.StatusServiceUnavailable)
				return
			}
		}
		fmt.Fprintln(w, "ready")
	})
	return mux
}

func (s *Server) promMux() http.Handler {
	mux := http.NewServeMux()
	h := func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		_ = s.WritePrometheus(w)
	}
	mux.HandleFunc("/stats/prometheus", h)
	mux.HandleFunc("/metrics", h)
	return mux
}

// WritePrometheus writes the shared counters and this generation's gauges.
func (s *Server) WritePrometheus(w interface{ Write([]byte) (int, error) }) error {
	if err := s.o.Stats.WritePrometheus(w); err != nil {
		return err
	}
	if s.o.Gatherer != nil {
		mfs, err := s.o.Gatherer.Gather()
		if err != nil {
			s.log.Debug("gathering metrics", "err", err)
		}
		for _, mf := range mfs {
			if _, err := expfmt.MetricFamilyToText(w, mf); err != nil {
				return err
			}
		}
	}
	in, out := s.Active()
	draining := 0
	if s.Draining() {
		draining = 1
	}
	_, err := fmt.Fprintf(w, `# TYPE meshlet_proxy_active_connections gauge
meshlet_proxy_active_connections{direction="inbound"} %d
meshlet_proxy_active_connections{direction="outbound"} %d
# TYPE meshlet_proxy_generation gauge
meshlet_proxy_generation %d
# TYPE meshlet_proxy_draining gauge
meshlet_proxy_draining %d
# TYPE meshlet_proxy_uptime_seconds gauge
meshlet_proxy_uptime_seconds %.3f
`, in, out, s.o.Generation, draining, time.Since(s.started).Seconds())
	return err
}

// ServerInfo is the /server_info document.
type ServerInfo struct { //nolint:revive // named after the endpoint (Envoy's /server_info) that users know
	Version       string  `json:"version"`
	State         string  `json:"state"`
	Generation    int     `json:"generation"`
	PID           int     `json:"pid"`
	StartTime     string  `json:"startTime"`
	UptimeSeconds float64 `json:"uptimeSeconds"`
	ConfigHash    string  `json:"configHash"`
	// LastReloadError is the agent's report of the last failed reload
	// (empty when the last reload succeeded).
	LastReloadError   string `json:"lastReloadError,omitempty"`
	ActiveConnections struct {
		Inbound  int64 `json:"inbound"`
		Outbound int64 `json:"outbound"`
	} `json:"activeConnections"`
	// Dynamic is the run-time configuration's state (Options.Dynamic),
	// e.g. the xDS client's source, connection, versions and last NACK.
	Dynamic any `json:"dynamic,omitempty"`
}

// Info returns the current /server_info document.
func (s *Server) Info() ServerInfo {
	si := ServerInfo{
		Version:         s.o.Version,
		State:           s.state(),
		Generation:      s.o.Generation,
		PID:             os.Getpid(),
		StartTime:       s.started.UTC().Format(time.RFC3339Nano),
		UptimeSeconds:   time.Since(s.started).Seconds(),
		ConfigHash:      s.o.Config.Hash,
		LastReloadError: s.o.Stats.Note(),
	}
	si.ActiveConnections.Inbound, si.ActiveConnections.Outbound = s.Active()
	if s.o.Dynamic != nil {
		si.Dynamic = s.o.Dynamic.Info()
	}
	return si
}

func (s *Server) adminMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/server_info", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(s.Info())
	})
	if s.o.Certs != nil {
		mux.HandleFunc("/certs", func(w http.ResponseWriter, _ *http.Request) {
			w.Header().Set("Content-Type", "application/json")
			enc := json.NewEncoder(w)
			enc.SetIndent("", "  ")
			_ = enc.Encode(s.o.Certs())
		})
	}
	mux.HandleFunc("/ready", func(w http.ResponseWriter, _ *http.Request) {
		if s.Draining() {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		fmt.Fprintln(w, s.state())
	})
	mux.HandleFunc("/stats", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		s.o.Stats.Each(func(name string, v uint64) { fmt.Fprintf(w, "%s: %d\n", name, v) })
		in, out := s.Active()
		fmt.Fprintf(w, "meshlet_proxy_active_connections{direction=\"inbound\"}: %d\nmeshlet_proxy_active_connections{direction=\"outbound\"}: %d\n", in, out)
	})
	mux.HandleFunc("/config_dump", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		doc := struct {
			// Configs is Envoy's shape (admin.v3.ConfigDump) for the
			// run-time configuration, when there is one.
			Configs    json.RawMessage `json:"configs,omitempty"`
			Generation int             `json:"generation"`
			ConfigHash string          `json:"configHash"`
			Effective  config.Config   `json:"effective"`
			Raw        string          `json:"raw"`
		}{Generation: s.o.Generation, ConfigHash: s.o.Config.Hash, Effective: s.o.Config.Config, Raw: string(s.o.Config.Raw)}
		if d := s.o.Dynamic; d != nil {
			b, err := d.ConfigDump(r.URL.Query().Has("include_eds"))
			var dump struct {
				Configs json.RawMessage `json:"configs"`
			}
			if err == nil {
				err = json.Unmarshal(b, &dump)
			}
			if err != nil {
				http.Error(w, fmt.Sprintf("config dump: %v", err), http.StatusInternalServerError)
				return
			}
			doc.Configs = dump.Configs
		}
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(doc)
	})
	return mux
}
