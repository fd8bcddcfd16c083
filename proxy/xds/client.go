package xds

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
)

// Protocol selects the xDS variant.
type Protocol string

// Protocols.
const (
	// Auto uses delta xDS and falls back to state of the world when the
	// server does not implement it.
	Auto  Protocol = ""
	Delta Protocol = "delta"
	SotW  Protocol = "sotw"
)

// Options configure a Client. Zero values mean the documented default.
type Options struct {
	// Address is the discovery server, host:port. Required.
	Address string
	// Node identifies the proxy (see Identity.Node). Required.
	Node *corev3.Node
	// Engine receives every complete configuration. Required.
	Engine Applier
	// Base is the static part of the engine configuration (the bootstrap
	// file's l7 section): xDS services and clusters are added to it.
	Base engineConfig
	// StateFile keeps the last applied resources (the pod's runtime
	// volume), so that a generation that starts while the control plane is
	// unreachable serves them at once; empty: nothing is kept.
	StateFile string
	// Protocol: Auto (default), Delta or SotW.
	Protocol Protocol
	// BackoffInitial and BackoffMax bound the reconnect delay, which
	// doubles from the initial value with full jitter (Envoy's 500ms and
	// 30s by default).
	BackoffInitial, BackoffMax time.Duration
	// TLS, when set, secures the connection to the server (the discovery
	// server's TLS port, 15012, with the workload certificate:
	// identity.Store.ControlPlaneTLS); nil: plain text.
	TLS *tls.Config
	// DialOptions are added to the gRPC dial.
	DialOptions []grpc.DialOption
	// Metrics are updated if set.
	Metrics *Metrics
	// Log receives the client's logs; nil: discard.
	Log *slog.Logger
}

// Source says where the configuration being served came from.
type Source string

// Sources.
const (
	SourceNone         Source = "none"
	SourcePersisted    Source = "persisted"
	SourceControlPlane Source = "control-plane"
)

// nack is the last rejected update of a type.
type nack struct {
	version, nonce, details string
	at                      time.Time
	// rejected are the resources of the update, by name, for the dump.
	rejected map[string]*anypb.Any
}

// Client is an ADS client: it subscribes to the proxy's resources,
// validates and translates each update as a whole, hands the result to the
// engine and ACKs or NACKs it. Run it with Run; it is safe for concurrent
// use.
type Client struct {
	o   Options
	log *slog.Logger

	mu        sync.Mutex
	res       resources // accepted
	tbl       *table    // applied
	source    Source
	connected bool
	protocol  Protocol // of the current stream
	lastApply time.Time
	nacks     map[string]*nack // by type
	ready     chan struct{}    // closed once a complete configuration serves
	readyOnce sync.Once

	resGen  uint64        // counts accepted states (persistence)
	persist chan struct{} // a new state to persist
}

// New checks o and returns a client; nothing is sent until Run.
func New(o Options) (*Client, error) {
	var errs []error
	if o.Address == "" {
		errs = append(errs, errors.New("xds: Options.Address is required"))
	}
	if o.Node.GetId() == "" {
		errs = append(errs, errors.New("xds: Options.Node with an id is required"))
	}
	if o.Engine == nil {
		errs = append(errs, errors.New("xds: Options.Engine is required"))
	}
	switch o.Protocol {
	case Auto, Delta, SotW:
	default:
		errs = append(errs, fmt.Errorf("xds: protocol %q is not one of delta, sotw (empty: auto)", o.Protocol))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if o.BackoffInitial <= 0 {
		o.BackoffInitial = 500 * time.Millisecond
	}
	if o.BackoffMax <= 0 {
		o.BackoffMax = 30 * time.Second
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	c := &Client{o: o, log: o.Log, res: newResources(), source: SourceNone, nacks: map[string]*nack{},
		ready: make(chan struct{}), persist: make(chan struct{}, 1)}
	return c, nil
}

// Ready returns nil once a complete configuration serves (from the control
// plane or the persisted state), an error saying what is missing before.
func (c *Client) Ready() error {
	select {
	case <-c.ready:
		return nil
	default:
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.tbl != nil && !c.tbl.complete() {
		return fmt.Errorf("%w: warming clusters %v, route configurations %v", errNotReady, c.tbl.warmingClusters, c.tbl.warmingRoutes)
	}
	return errNotReady
}

// ReadyC is closed once a complete configuration serves.
func (c *Client) ReadyC() <-chan struct{} { return c.ready }

// LoadPersisted applies the persisted state, if there is one, and reports
// whether it did. The client then serves it, says so (Status, the
// meshlet_xds_persisted_config metric, a log line) until the control plane
// sends an update, and resubscribes with its versions.
func (c *Client) LoadPersisted() (bool, error) {
	if c.o.StateFile == "" {
		return false, nil
	}
	r, savedAt, err := readState(c.o.StateFile)
	if err != nil || r == nil {
		return false, err
	}
	tbl := assemble(c.o.Base, r, nil)
	if err := c.o.Engine.Apply(tbl.cfg); err != nil {
		return false, fmt.Errorf("applying the persisted configuration %s: %w", c.o.StateFile, err)
	}
	c.mu.Lock()
	c.res, c.tbl, c.source, c.lastApply = r, tbl, SourcePersisted, time.Now()
	c.mu.Unlock()
	c.o.Metrics.persisted(true)
	c.log.Warn("serving the persisted configuration until the control plane answers", "file", c.o.StateFile,
		"savedAt", savedAt.UTC().Format(time.RFC3339), "clusters", len(r[ClusterType].entries), "listeners", len(r[ListenerType].entries))
	if tbl.complete() {
		c.readyOnce.Do(func() { close(c.ready) })
	}
	return true, nil
}

// Run connects to the server and keeps the subscription until ctx ends,
// reconnecting with backoff. It returns ctx's error.
func (c *Client) Run(ctx context.Context) error {
	var wg sync.WaitGroup
	if c.o.StateFile != "" {
		wg.Add(1)
		go func() { defer wg.Done(); c.persistLoop(ctx) }()
	}
	defer wg.Wait()
	creds := insecure.NewCredentials()
	if c.o.TLS != nil {
		creds = credentials.NewTLS(c.o.TLS)
	}
	opts := append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, c.o.DialOptions...)
	conn, err := grpc.NewClient(c.o.Address, opts...)
	if err != nil {
		return fmt.Errorf("xds: discovery address %q: %w", c.o.Address, err)
	}
	defer conn.Close()
	ads := discoveryv3.NewAggregatedDiscoveryServiceClient(conn)
	proto := c.o.Protocol
	backoff := c.o.BackoffInitial
	for {
		if proto == Auto || proto == Delta {
			proto = Delta
		}
		start := time.Now()
		err := c.stream(ctx, ads, proto)
		c.setConnected(false, "")
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if proto == Delta && c.o.Protocol == Auto && status.Code(err) == codes.Unimplemented {
			c.log.Info("the discovery server does not serve delta xDS; using state of the world", "address", c.o.Address)
			proto = SotW
			continue
		}
		if time.Since(start) > 10*time.Second {
			backoff = c.o.BackoffInitial // it worked for a while
		}
		wait := time.Duration(rand.Int64N(int64(backoff)) + 1)
		c.log.Warn("xDS stream ended; reconnecting", "address", c.o.Address, "err", err, "in", wait.Round(time.Millisecond))
		c.o.Metrics.reconnect()
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(wait):
		}
		backoff = min(2*backoff, c.o.BackoffMax)
	}
}

func (c *Client) setConnected(v bool, p Protocol) {
	c.mu.Lock()
	c.connected, c.protocol = v, p
	c.mu.Unlock()
	c.o.Metrics.connected(v)
}

// response is a SotW or delta response in one shape.
type response struct {
	typeURL, version, nonce string
	full                    bool // SotW: the set replaces the type's resources
	resources               []namedResource
	removed                 []string
	received                time.Time
}

type namedResource struct {
	name, version string
	raw           *anypb.Any
}

// sender sends one protocol's requests.
type sender interface {
	// subscribe (re)sends a type's subscription: names (nil: wildcard),
	// with the versions held, as the first request of a stream or after
	// the names changed.
	subscribe(typeURL string, names, prev []string, initial bool) error
	// ack or nack (errMsg non-empty) the response.
	reply(r *response, acceptedVersion, errMsg string) error
}

func (c *Client) stream(ctx context.Context, ads discoveryv3.AggregatedDiscoveryServiceClient, proto Protocol) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var snd sender
	var recv func() (*response, error)
	if proto == Delta {
		s, err := ads.DeltaAggregatedResources(ctx)
		if err != nil {
			return err
		}
		d := &deltaSender{s: s, node: c.o.Node, c: c}
		snd = d
		recv = func() (*response, error) {
			m, err := s.Recv()
			if err != nil {
				return nil, err
			}
			r := &response{typeURL: m.GetTypeUrl(), version: m.GetSystemVersionInfo(), nonce: m.GetNonce(), removed: m.GetRemovedResources(), received: time.Now()}
			for _, x := range m.GetResources() {
				r.resources = append(r.resources, namedResource{name: x.GetName(), version: x.GetVersion(), raw: x.GetResource()})
			}
			return r, nil
		}
	} else {
		s, err := ads.StreamAggregatedResources(ctx)
		if err != nil {
			return err
		}
		snd = &sotwSender{s: s, node: c.o.Node, c: c, nonces: map[string]string{}, names: map[string][]string{}}
		recv = func() (*response, error) {
			m, err := s.Recv()
			if err != nil {
				return nil, err
			}
			r := &response{typeURL: m.GetTypeUrl(), version: m.GetVersionInfo(), nonce: m.GetNonce(), full: true, received: time.Now()}
			for _, x := range m.GetResources() {
				r.resources = append(r.resources, namedResource{version: m.GetVersionInfo(), raw: x})
			}
			return r, nil
		}
	}
	// Subscribe in Envoy's order, with what is held (resubscription).
	c.mu.Lock()
	subs := c.res.subscriptions()
	c.mu.Unlock()
	for _, t := range typeOrder {
		names, wildcard := subs[t], t == ClusterType || t == ListenerType
		if !wildcard && len(names) == 0 {
			continue
		}
		if err := snd.subscribe(t, names, nil, true); err != nil {
			return err
		}
	}
	first := true
	for {
		r, err := recv()
		if err != nil {
			return err
		}
		if first {
			c.setConnected(true, proto)
			c.log.Info("xDS stream established", "address", c.o.Address, "protocol", string(proto))
			first = false
		}
		if err := c.handle(r, snd, subs); err != nil {
			return err
		}
		if namesSubscriptions(r.typeURL) {
			c.mu.Lock()
			subs = c.res.subscriptions()
			c.mu.Unlock()
		}
	}
}

// handle validates, translates and applies one response and answers it.
// subs are the by-name subscriptions before it; changed ones are sent.
func (c *Client) handle(r *response, snd sender, subs map[string][]string) error {
	c.mu.Lock()
	cur := c.res[r.typeURL]
	c.mu.Unlock()
	if cur == nil {
		return snd.reply(r, "", fmt.Sprintf("%s: type not subscribed", r.typeURL))
	}
	next := &typeState{version: r.version, entries: map[string]*entry{}, received: true}
	if !r.full {
		next = cur.clone()
		next.version, next.received = r.version, true
		for _, n := range r.removed {
			delete(next.entries, n)
		}
	}
	var errs, got []string
	rejected := map[string]*anypb.Any{}
	for _, x := range r.resources {
		old := cur.held(r.typeURL, x)
		if e := reuse(old, x); e != nil {
			next.entries[e.name] = e
			got = append(got, e.name)
			continue
		}
		e, err := decode(r.typeURL, x.raw, x.version, r.received, old)
		if err != nil {
			errs = append(errs, err.Error())
			name := x.name
			if e != nil && e.name != "" {
				name = e.name
			}
			rejected[name] = x.raw
			continue
		}
		if x.name != "" && x.name != e.name {
			errs = append(errs, fmt.Sprintf("%s %s: the delta resource is named %q", shortType(r.typeURL), e.name, x.name))
			continue
		}
		if old := cur.entries[e.name]; old != nil && old.version == e.version && r.full {
			e.updated = old.updated // unchanged in this SotW response
		}
		next.entries[e.name] = e
		got = append(got, e.name)
	}
	var tbl *table
	if len(errs) == 0 {
		c.mu.Lock()
		cand := c.res.with(r.typeURL, next)
		prev := c.tbl
		c.mu.Unlock()
		tbl = assemble(c.o.Base, cand, prev)
		apply := c.o.Engine.Apply
		if r.typeURL == EndpointType {
			apply = func(engineConfig) error { return applyTable(c.o.Engine, prev, tbl) }
		}
		if err := apply(tbl.cfg); err != nil {
			errs = append(errs, fmt.Sprintf("%s update rejected by the engine: %v", shortType(r.typeURL), strings.ReplaceAll(err.Error(), "\n", "; ")))
			for _, n := range got {
				rejected[n] = next.entries[n].raw
			}
		} else {
			applied := time.Now()
			c.mu.Lock()
			c.res, c.tbl, c.lastApply = cand, tbl, applied
			c.resGen++
			c.source = SourceControlPlane
			delete(c.nacks, r.typeURL)
			c.mu.Unlock()
			c.queuePersist()
			c.o.Metrics.applied(r.typeURL, applied.Sub(r.received), applied)
			c.log.Debug("xDS update applied", "type", shortType(r.typeURL), "version", r.version, "resources", len(r.resources),
				"removed", len(r.removed), "took", applied.Sub(r.received))
			if tbl.complete() {
				c.readyOnce.Do(func() {
					close(c.ready)
					c.log.Info("first complete configuration from the control plane applied", "clusters", len(tbl.cfg.Clusters), "services", len(tbl.cfg.Services))
				})
			}
		}
	}
	if len(errs) > 0 {
		msg := strings.Join(errs, "; ")
		c.mu.Lock()
		c.nacks[r.typeURL] = &nack{version: r.version, nonce: r.nonce, details: msg, at: time.Now(), rejected: rejected}
		accepted := cur.version
		c.mu.Unlock()
		c.o.Metrics.rejected(r.typeURL)
		c.log.Warn("xDS update rejected (NACK)", "type", shortType(r.typeURL), "version", r.version, "err", msg)
		return snd.reply(r, accepted, msg)
	}
	if err := snd.reply(r, r.version, ""); err != nil {
		return err
	}
	if !namesSubscriptions(r.typeURL) {
		return nil // the subscriptions did not change
	}
	c.mu.Lock()
	now := c.res.subscriptions()
	c.mu.Unlock()
	for _, t := range []string{EndpointType, RouteType} {
		if !slices.Equal(now[t], subs[t]) {
			if err := snd.subscribe(t, now[t], subs[t], false); err != nil {
				return err
			}
		}
	}
	return nil
}

// namesSubscriptions reports whether resources of type t name what the
// client subscribes to by name (listeners their route configurations,
// clusters their EDS names; see resources.subscriptions).
func namesSubscriptions(t string) bool { return t == ClusterType || t == ListenerType }

// versions returns the held resources' versions of type t (delta's
// initial_resource_versions).
func (c *Client) versions(t string) map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := map[string]string{}
	for n, e := range c.res[t].entries {
		out[n] = e.version
	}
	return out
}

func (c *Client) acceptedVersion(t string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.res[t].version
}

type sotwSender struct {
	s      grpc.BidiStreamingClient[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]
	node   *corev3.Node
	c      *Client
	sent   bool
	nonces map[string]string
	names  map[string][]string
}

func (s *sotwSender) send(req *discoveryv3.DiscoveryRequest) error {
	if !s.sent {
		req.Node, s.sent = s.node, true
	}
	return s.s.Send(req)
}

func (s *sotwSender) subscribe(t string, names, _ []string, initial bool) error {
	s.names[t] = names
	req := &discoveryv3.DiscoveryRequest{TypeUrl: t, ResourceNames: names, VersionInfo: s.c.acceptedVersion(t), ResponseNonce: s.nonces[t]}
	return s.send(req)
}

func (s *sotwSender) reply(r *response, accepted, errMsg string) error {
	s.nonces[r.typeURL] = r.nonce
	req := &discoveryv3.DiscoveryRequest{TypeUrl: r.typeURL, VersionInfo: accepted, ResponseNonce: r.nonce, ResourceNames: s.names[r.typeURL]}
	if errMsg != "" {
		req.ErrorDetail = &statuspb.Status{Code: int32(codes.InvalidArgument), Message: errMsg}
	}
	return s.send(req)
}

type deltaSender struct {
	s    grpc.BidiStreamingClient[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]
	node *corev3.Node
	c    *Client
	sent bool
}

func (s *deltaSender) send(req *discoveryv3.DeltaDiscoveryRequest) error {
	if !s.sent {
		req.Node, s.sent = s.node, true
	}
	return s.s.Send(req)
}

func (s *deltaSender) subscribe(t string, names, prev []string, initial bool) error {
	req := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: t}
	if initial {
		req.ResourceNamesSubscribe = names
		if v := s.c.versions(t); len(v) > 0 {
			req.InitialResourceVersions = v
		}
		return s.send(req)
	}
	old := map[string]bool{}
	for _, n := range prev {
		old[n] = true
	}
	for _, n := range names {
		if !old[n] {
			req.ResourceNamesSubscribe = append(req.ResourceNamesSubscribe, n)
		}
		delete(old, n)
	}
	req.ResourceNamesUnsubscribe = slices.Sorted(maps.Keys(old))
	if len(req.ResourceNamesSubscribe)+len(req.ResourceNamesUnsubscribe) == 0 {
		return nil
	}
	return s.send(req)
}

func (s *deltaSender) reply(r *response, _, errMsg string) error {
	req := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: r.typeURL, ResponseNonce: r.nonce}
	if errMsg != "" {
		req.ErrorDetail = &statuspb.Status{Code: int32(codes.InvalidArgument), Message: errMsg}
	}
	return s.send(req)
}

// Status is the client's state for /server_info and the admin dump.
type Status struct {
	// Address of the discovery server.
	Address string `json:"address"`
	// Connected reports an established ADS stream; Protocol is its
	// variant (delta or sotw).
	Connected bool     `json:"connected"`
	Protocol  Protocol `json:"protocol,omitempty"`
	// Source of the configuration being served: none, persisted (the last
	// good configuration from the runtime volume, not yet confirmed by the
	// control plane) or control-plane.
	Source Source `json:"source"`
	// Ready once a complete configuration serves.
	Ready bool `json:"ready"`
	// LastUpdate is when the last update was applied.
	LastUpdate string `json:"lastUpdate,omitempty"`
	// Versions are the accepted versions by type (lds, rds, cds, eds).
	Versions map[string]string `json:"versions,omitempty"`
	// Warming lists clusters waiting for endpoints and route
	// configurations waiting to arrive.
	WarmingClusters []string `json:"warmingClusters,omitempty"`
	WarmingRoutes   []string `json:"warmingRoutes,omitempty"`
	// LastNACK is the last rejection per type, with its message.
	LastNACK map[string]NACK `json:"lastNack,omitempty"`
}

// NACK is a rejected update.
type NACK struct {
	Version string `json:"version"`
	Time    string `json:"time"`
	Message string `json:"message"`
}

// Status returns the client's current state.
func (c *Client) Status() Status {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := Status{Address: c.o.Address, Connected: c.connected, Protocol: c.protocol, Source: c.source, Versions: map[string]string{}}
	select {
	case <-c.ready:
		s.Ready = true
	default:
	}
	if !c.lastApply.IsZero() {
		s.LastUpdate = c.lastApply.UTC().Format(time.RFC3339Nano)
	}
	for _, t := range typeOrder {
		if v := c.res[t].version; v != "" {
			s.Versions[metricType(t)] = v
		}
	}
	if c.tbl != nil {
		s.WarmingClusters, s.WarmingRoutes = c.tbl.warmingClusters, c.tbl.warmingRoutes
	}
	for t, n := range c.nacks {
		if s.LastNACK == nil {
			s.LastNACK = map[string]NACK{}
		}
		s.LastNACK[metricType(t)] = NACK{Version: n.version, Time: n.at.UTC().Format(time.RFC3339Nano), Message: n.details}
	}
	return s
}
