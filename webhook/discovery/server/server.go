package server

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"github.com/go-logr/logr"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	"k8s.io/client-go/kubernetes"

	"github.com/meshlet/meshlet/webhook/discovery/translate"
)

// Defaults (istiod's ports and debounce).
const (
	DefaultXDSAddr     = ":15010"
	DefaultMetricsAddr = ":15014"
	DefaultDebounce    = 100 * time.Millisecond
	DefaultDebounceMax = time.Second
)

// Options configure a Server. Zero values mean the defaults.
type Options struct {
	// XDSAddr is where ADS is served in plain text (gRPC); "-" disables it
	// (then TLSAddr is required).
	XDSAddr string
	// TLSAddr, when set, also serves ADS over TLS there (istiod's 15012),
	// with TLS as the listener's configuration, on one gRPC server that
	// carries what TLSServices registers as well (the mesh CA's
	// certificate API) and refuses streams with TLSStreamInterceptor (a
	// caller without a workload certificate). All three come from the CA:
	// webhook/ca's CA.TLSConfig, CA.Register, RequireWorkloadCertificate.
	TLSAddr              string
	TLS                  *tls.Config
	TLSServices          func(grpc.ServiceRegistrar)
	TLSStreamInterceptor grpc.StreamServerInterceptor
	// MetricsAddr serves /metrics, /healthz, /ready and /debug/syncz;
	// "-" disables it.
	MetricsAddr string
	// Replica names this replica in proxy status (the pod name).
	Replica string
	// Domain is the cluster DNS suffix; RootNamespace holds mesh-wide
	// Sidecars, AuthorizationPolicies and PeerAuthentications (default
	// translate.DefaultRootNamespace).
	Domain        string
	RootNamespace string
	// TrustDomain is the SPIFFE trust domain of workload identities (the
	// CA's): the SPIFFE IDs clusters expect of meshed pods (default
	// translate.DefaultTrustDomain).
	TrustDomain string
	// Debounce is the quiet time after a change before a push; a burst is
	// pushed at the latest after DebounceMax.
	Debounce, DebounceMax time.Duration
	// Kube and Istio are the clients the informers (and Events) use.
	Kube  kubernetes.Interface
	Istio istioclient.Interface
	// Resync of the informers (0: none; watch, don't poll).
	Resync time.Duration
	// Registry receives the metrics (nil: a new registry).
	Registry *prometheus.Registry
	Log      logr.Logger
}

// Server is one control-plane replica.
type Server struct {
	opts    Options
	log     logr.Logger
	sidecar cachev3.SnapshotCache // ADS ordering for sidecars
	grpc    cachev3.SnapshotCache // named LDS for proxyless gRPC
	mux     *cachev3.MuxCache
	shared  *sharedCache // what the xDS server watches (mux, with shared bytes)
	xds     serverv3.Server
	track   *tracker
	metrics *metrics
	inputs  func() *translate.Inputs
	events  *eventSink

	pushMu sync.Mutex // one push (or node registration) at a time
	mesh   atomic.Pointer[translate.Mesh]
	// shapes are the snapshots of the last push by translate key, and
	// intern its resources by content; a proxy that connects between
	// pushes reuses them (under pushMu).
	shapes  map[string]*built
	intern  *internTable
	nodesMu sync.Mutex
	nodes   map[string]*node // by node id
	streams map[int64]string // stream → node id
	trigger chan struct{}
	ready   chan struct{}
	pushes  atomic.Int64 // completed pushes
	xdsAddr atomic.Value // net.Addr
	tlsAddr atomic.Value // net.Addr
	webAddr atomic.Value // net.Addr
}

type node struct {
	proxy   translate.Proxy
	streams int
	version string // of the snapshot last set
}

// New checks opts and returns a Server; Run starts it.
func New(opts Options) (*Server, error) {
	var errs []error
	if opts.Kube == nil {
		errs = append(errs, errors.New("options: Kube client is required"))
	}
	if opts.Istio == nil {
		errs = append(errs, errors.New("options: Istio client is required"))
	}
	if opts.Debounce < 0 || opts.DebounceMax < 0 {
		errs = append(errs, fmt.Errorf("options: debounce %v / max %v must not be negative", opts.Debounce, opts.DebounceMax))
	}
	if opts.TLSAddr != "" && opts.TLS == nil {
		errs = append(errs, fmt.Errorf("options: TLSAddr %s needs a TLS configuration", opts.TLSAddr))
	}
	if opts.XDSAddr == "-" && opts.TLSAddr == "" {
		errs = append(errs, errors.New("options: plain-text xDS is disabled (XDSAddr -) and no TLSAddr is set: xDS would be served nowhere"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if opts.XDSAddr == "" {
		opts.XDSAddr = DefaultXDSAddr
	}
	if opts.MetricsAddr == "" {
		opts.MetricsAddr = DefaultMetricsAddr
	}
	if opts.Debounce == 0 {
		opts.Debounce = DefaultDebounce
	}
	if opts.DebounceMax == 0 {
		opts.DebounceMax = DefaultDebounceMax
	}
	if opts.Registry == nil {
		opts.Registry = prometheus.NewRegistry()
	}
	s := &Server{opts: opts, log: opts.Log, track: newTracker(opts.Replica), metrics: newMetrics(opts.Registry),
		nodes: map[string]*node{}, streams: map[int64]string{}, trigger: make(chan struct{}, 1), ready: make(chan struct{})}
	logger := cacheLogger{s.log.V(2)}
	s.sidecar = cachev3.NewSnapshotCache(true, cachev3.IDHash{}, logger)
	s.grpc = cachev3.NewSnapshotCache(false, cachev3.IDHash{}, logger)
	s.mux = &cachev3.MuxCache{
		Classify:      func(r *cachev3.Request) string { return generator(r.GetNode()) },
		ClassifyDelta: func(r *cachev3.DeltaRequest) string { return generator(r.GetNode()) },
		Caches:        map[string]cachev3.Cache{"": s.sidecar, translate.GeneratorGRPC: s.grpc},
	}
	s.shared = newSharedCache(s.mux, func(n *corev3.Node) bool { return generator(n) == "" })
	return s, nil
}

func generator(n *corev3.Node) string {
	if n.GetMetadata().GetFields()["GENERATOR"].GetStringValue() == translate.GeneratorGRPC {
		return translate.GeneratorGRPC
	}
	return ""
}

// Ready is closed once the informers synced, the first push is done and
// ADS is being served.
func (s *Server) Ready() <-chan struct{} { return s.ready }

// XDSAddr is the address ADS listens on (after Ready).
func (s *Server) XDSAddr() net.Addr { a, _ := s.xdsAddr.Load().(net.Addr); return a }

// TLSAddr is the address of the TLS gRPC server (after Ready; nil without
// Options.TLSAddr).
func (s *Server) TLSAddr() net.Addr { a, _ := s.tlsAddr.Load().(net.Addr); return a }

// MetricsAddr is the address of the HTTP endpoints (after Ready).
func (s *Server) MetricsAddr() net.Addr { a, _ := s.webAddr.Load().(net.Addr); return a }

// Status lists the connected proxies and what each has of every type.
func (s *Server) Status() []ProxyStatus { return s.track.snapshot() }

// Run serves until ctx ends.
func (s *Server) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	inputs, err := s.startInformers(ctx)
	if err != nil {
		return err
	}
	s.inputs = inputs
	s.events = newEventSink(ctx, s.opts.Kube, s.log)
	defer s.events.stop()

	var lis, tlsLis net.Listener
	closeAll := func() {
		for _, l := range []net.Listener{lis, tlsLis} {
			if l != nil {
				l.Close()
			}
		}
	}
	if s.opts.XDSAddr != "-" {
		if lis, err = net.Listen("tcp", s.opts.XDSAddr); err != nil {
			return fmt.Errorf("listening for xDS on %s: %w", s.opts.XDSAddr, err)
		}
		s.xdsAddr.Store(lis.Addr())
	}
	if s.opts.TLSAddr != "" {
		if tlsLis, err = net.Listen("tcp", s.opts.TLSAddr); err != nil {
			closeAll()
			return fmt.Errorf("listening for xDS over TLS on %s: %w", s.opts.TLSAddr, err)
		}
		s.tlsAddr.Store(tlsLis.Addr())
	}
	var web *http.Server
	if s.opts.MetricsAddr != "-" {
		wl, err := net.Listen("tcp", s.opts.MetricsAddr)
		if err != nil {
			closeAll()
			return fmt.Errorf("listening for metrics on %s: %w", s.opts.MetricsAddr, err)
		}
		s.webAddr.Store(wl.Addr())
		web = &http.Server{Handler: s.httpHandler(), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := web.Serve(wl); err != nil && !errors.Is(err, http.ErrServerClosed) {
				s.log.Error(err, "metrics server stopped")
			}
		}()
		defer web.Close()
	}

	s.push(ctx, "initial")
	s.xds = serverv3.NewServer(ctx, s.shared, s.callbacks())
	serverOpts := []grpc.ServerOption{
		grpc.MaxConcurrentStreams(1 << 20),
		// SotW responses are encoded once per shape (wire.go).
		grpc.ForceServerCodecV2(newWireCodec()),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 15 * time.Second, PermitWithoutStream: true}),
	}
	serveErr := make(chan error, 2)
	var servers []*grpc.Server
	if lis != nil {
		gs := grpc.NewServer(serverOpts...)
		discoverygrpc.RegisterAggregatedDiscoveryServiceServer(gs, s.xds)
		servers = append(servers, gs)
		go func() { serveErr <- gs.Serve(lis) }()
		s.log.Info("serving xDS", "addr", lis.Addr().String(), "replica", s.opts.Replica)
	}
	if tlsLis != nil {
		opts := append(serverOpts, grpc.Creds(credentials.NewTLS(s.opts.TLS)))
		if s.opts.TLSStreamInterceptor != nil {
			opts = append(opts, grpc.StreamInterceptor(s.opts.TLSStreamInterceptor))
		}
		gs := grpc.NewServer(opts...)
		discoverygrpc.RegisterAggregatedDiscoveryServiceServer(gs, s.xds)
		if s.opts.TLSServices != nil {
			s.opts.TLSServices(gs)
		}
		servers = append(servers, gs)
		go func() { serveErr <- gs.Serve(tlsLis) }()
		s.log.Info("serving xDS over TLS", "addr", tlsLis.Addr().String(), "replica", s.opts.Replica)
	}
	close(s.ready)

	go s.debounce(ctx)
	select {
	case <-ctx.Done():
		for _, gs := range servers {
			gs.Stop()
		}
		return nil
	case err := <-serveErr:
		for _, gs := range servers {
			gs.Stop()
		}
		return fmt.Errorf("serving xDS: %w", err)
	}
}

// changed asks for a push (debounced).
func (s *Server) changed() {
	select {
	case s.trigger <- struct{}{}:
	default:
	}
}

func (s *Server) debounce(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.trigger:
		}
		first := time.Now()
		t := time.NewTimer(s.opts.Debounce)
	wait:
		for {
			select {
			case <-ctx.Done():
				t.Stop()
				return
			case <-s.trigger:
				if time.Since(first) < s.opts.DebounceMax {
					t.Reset(min(s.opts.Debounce, s.opts.DebounceMax-time.Since(first)))
				}
			case <-t.C:
				break wait
			}
		}
		s.push(ctx, "change")
	}
}

func (s *Server) cacheFor(p translate.Proxy) cachev3.SnapshotCache {
	if p.Generator == translate.GeneratorGRPC {
		return s.grpc
	}
	return s.sidecar
}

// push recompiles the mesh and sets a new snapshot for every proxy whose
// resources changed; proxies whose resources are the same are not pushed.
func (s *Server) push(ctx context.Context, reason string) {
	s.pushMu.Lock()
	defer s.pushMu.Unlock()
	start := time.Now()
	mesh := translate.Compile(s.inputs())
	s.mesh.Store(mesh)
	s.events.warn(mesh.Warnings())
	s.metrics.warnings.Set(float64(len(mesh.Warnings())))

	s.nodesMu.Lock()
	ids := make([]string, 0, len(s.nodes))
	proxies := make(map[string]*node, len(s.nodes))
	for id, n := range s.nodes {
		ids = append(ids, id)
		proxies[id] = n
	}
	s.nodesMu.Unlock()
	s.shapes, s.intern = map[string]*built{}, newInternTable(s.intern)
	pushed := 0
	for _, id := range ids {
		n := proxies[id]
		b, err := s.snapshotFor(mesh, n.proxy)
		if err != nil {
			s.log.Error(err, "building resources", "node", id)
			continue
		}
		if b.version == n.version {
			continue
		}
		if err := s.shared.SetSnapshot(ctx, s.cacheFor(n.proxy), id, b); err != nil {
			s.log.Error(err, "setting snapshot", "node", id)
			continue
		}
		n.version = b.version
		pushed++
	}
	d := time.Since(start)
	s.pushes.Add(1)
	s.metrics.pushes.WithLabelValues(reason).Inc()
	s.metrics.pushDuration.Observe(d.Seconds())
	s.metrics.proxiesPushed.Add(float64(pushed))
	s.log.V(1).Info("pushed", "reason", reason, "proxies", len(ids), "changed", pushed, "shapes", len(s.shapes),
		"warnings", len(mesh.Warnings()), "duration", d.String())
}

// snapshotFor returns p's snapshot of the last push's mesh, built once per
// translate key (pushMu held).
func (s *Server) snapshotFor(mesh *translate.Mesh, p translate.Proxy) (*built, error) {
	key := mesh.Key(p)
	if b := s.shapes[key]; b != nil {
		return b, nil
	}
	b, err := buildSnapshot(mesh.ForProxy(p), s.intern)
	if err != nil {
		return nil, err
	}
	s.shapes[key] = b
	return b, nil
}

// addNode registers the stream's proxy and sets its snapshot before the
// first watch is created, so its first request is answered at once.
func (s *Server) addNode(ctx context.Context, stream int64, n *corev3.Node) error {
	p, err := translate.ParseNodeID(n.GetId())
	if err != nil {
		return status.Error(codes.InvalidArgument, err.Error())
	}
	md := n.GetMetadata().GetFields()
	ns := md["NAMESPACE"].GetStringValue()
	if ns == "" {
		return status.Errorf(codes.InvalidArgument, "node %q: node.metadata.NAMESPACE is required", n.GetId())
	}
	if ns != p.Namespace {
		return status.Errorf(codes.InvalidArgument, "node %q: node.metadata.NAMESPACE %q differs from the node id's namespace %q", n.GetId(), ns, p.Namespace)
	}
	p.Generator = generator(n)
	if l := md["LABELS"].GetStructValue(); l != nil {
		p.Labels = map[string]string{}
		for k, v := range l.GetFields() {
			p.Labels[k] = v.GetStringValue()
		}
	}
	s.track.setNode(stream, p.ID, p.Generator)

	s.pushMu.Lock()
	defer s.pushMu.Unlock()
	s.nodesMu.Lock()
	s.streams[stream] = p.ID
	nd := s.nodes[p.ID]
	if nd == nil {
		nd = &node{proxy: p}
		s.nodes[p.ID] = nd
	}
	nd.streams++
	nd.proxy = p
	s.metrics.connected.Set(float64(len(s.nodes)))
	s.nodesMu.Unlock()
	b, err := s.snapshotFor(s.mesh.Load(), p)
	if err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	if nd.version == b.version {
		return nil
	}
	if err := s.shared.SetSnapshot(ctx, s.cacheFor(p), p.ID, b); err != nil {
		return status.Error(codes.Internal, err.Error())
	}
	nd.version = b.version
	return nil
}

func (s *Server) removeStream(stream int64) {
	s.track.close(stream)
	s.nodesMu.Lock()
	defer s.nodesMu.Unlock()
	id, ok := s.streams[stream]
	if !ok {
		return
	}
	delete(s.streams, stream)
	if n := s.nodes[id]; n != nil {
		n.streams--
		if n.streams <= 0 {
			delete(s.nodes, id)
			s.shared.ClearSnapshot(s.cacheFor(n.proxy), id)
		}
	}
	s.metrics.connected.Set(float64(len(s.nodes)))
}

// answered records the ACK or NACK a request carries and returns the
// version it answers ("" when none).
func (s *Server) answered(stream int64, typeURL, nonce string, detail interface{ GetMessage() string }, node string) string {
	if nonce == "" {
		return ""
	}
	msg := ""
	if detail != nil {
		msg = detail.GetMessage()
		if msg == "" {
			msg = "(NACK without a message)"
		}
	}
	v, ack := s.track.answered(stream, typeURL, nonce, msg)
	if v == "" {
		return ""
	}
	short := shortType(typeURL)
	if ack {
		s.metrics.acks.WithLabelValues(short).Inc()
		return v
	}
	s.metrics.nacks.WithLabelValues(short).Inc()
	s.log.Info("proxy rejected configuration (NACK)", "node", node, "type", short, "version", v, "error", msg)
	return v
}

func shortType(typeURL string) string {
	switch typeURL {
	case resourcev3.ClusterType:
		return "CDS"
	case resourcev3.EndpointType:
		return "EDS"
	case resourcev3.ListenerType:
		return "LDS"
	case resourcev3.RouteType:
		return "RDS"
	}
	return typeURL[strings.LastIndex(typeURL, ".")+1:]
}

// callbacks record streams, nodes, responses, ACKs and NACKs. The SotW
// and delta servers number their streams independently, so delta stream
// ids are negated to keep one key space.
func (s *Server) callbacks() serverv3.Callbacks {
	return serverv3.CallbackFuncs{
		StreamOpenFunc: func(_ context.Context, id int64, _ string) error {
			s.track.open(id, false)
			return nil
		},
		DeltaStreamOpenFunc: func(_ context.Context, id int64, _ string) error {
			s.track.open(-id, true)
			return nil
		},
		StreamClosedFunc:      func(id int64, _ *corev3.Node) { s.removeStream(id) },
		DeltaStreamClosedFunc: func(id int64, _ *corev3.Node) { s.removeStream(-id) },
		StreamRequestFunc: func(id int64, r *discoverygrpc.DiscoveryRequest) error {
			if err := s.firstRequest(id, r.GetNode()); err != nil {
				return err
			}
			var detail interface{ GetMessage() string }
			if r.GetErrorDetail() != nil {
				detail = r.GetErrorDetail()
			}
			v := s.answered(id, r.GetTypeUrl(), r.GetResponseNonce(), detail, r.GetNode().GetId())
			if detail != nil && v != "" {
				// A NACK carries the previous version; the cache would answer
				// it with the rejected version again, at once and forever.
				// Treat the rejected version as the proxy's, so the next
				// response is the next change (docs/xds.md).
				r.VersionInfo = v
			}
			return nil
		},
		StreamResponseFunc: func(_ context.Context, id int64, _ *discoverygrpc.DiscoveryRequest, r *discoverygrpc.DiscoveryResponse) {
			s.track.sent(id, r.GetTypeUrl(), r.GetVersionInfo(), r.GetNonce())
		},
		StreamDeltaRequestFunc: func(id int64, r *discoverygrpc.DeltaDiscoveryRequest) error {
			if err := s.firstRequest(-id, r.GetNode()); err != nil {
				return err
			}
			var detail interface{ GetMessage() string }
			if r.GetErrorDetail() != nil {
				detail = r.GetErrorDetail()
			}
			s.answered(-id, r.GetTypeUrl(), r.GetResponseNonce(), detail, s.streamNode(-id))
			return nil
		},
		StreamDeltaResponseFunc: func(id int64, _ *discoverygrpc.DeltaDiscoveryRequest, r *discoverygrpc.DeltaDiscoveryResponse) {
			s.track.sent(-id, r.GetTypeUrl(), r.GetSystemVersionInfo(), r.GetNonce())
		},
	}
}

func (s *Server) streamNode(id int64) string {
	s.nodesMu.Lock()
	defer s.nodesMu.Unlock()
	return s.streams[id]
}

func (s *Server) firstRequest(id int64, n *corev3.Node) error {
	s.nodesMu.Lock()
	_, known := s.streams[id]
	s.nodesMu.Unlock()
	if known {
		return nil
	}
	if n == nil || n.GetId() == "" {
		return status.Error(codes.InvalidArgument, "the first request of a stream must carry node.id")
	}
	return s.addNode(context.Background(), id, n)
}

func (s *Server) httpHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(s.opts.Registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/ready", func(w http.ResponseWriter, _ *http.Request) {
		select {
		case <-s.ready:
			_, _ = w.Write([]byte("ok\n"))
		default:
			http.Error(w, "informers not synced yet", http.StatusServiceUnavailable)
		}
	})
	mux.HandleFunc("/debug/syncz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		st := s.Status()
		if st == nil {
			st = []ProxyStatus{}
		}
		_ = json.NewEncoder(w).Encode(SyncStatus{Replica: s.opts.Replica, Proxies: st})
	})
	return mux
}

// SyncStatus is the /debug/syncz document.
type SyncStatus struct {
	Replica string        `json:"replica"`
	Proxies []ProxyStatus `json:"proxies"`
}

// TypeNames lists the xDS types in ADS order, for display.
var TypeNames = slices.Clone(typeOrder)
