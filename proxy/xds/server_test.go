package xds

import (
	"github.com/meshlet/meshlet/proxy/xds/xdstest"

	"context"
	"sync"
	"testing"
	"time"
)

// testNode is the node id every test client uses.
var testIdentity = Identity{PodName: "client-0", Namespace: "shop", IP: "127.0.0.1", ServiceAccount: "client", Labels: map[string]string{"app": "client"}}

// cp is the test's ADS server.
type cp = xdstest.Server

func startCP(t testing.TB, addr string) *cp {
	return xdstest.StartServer(t, addr, testIdentity.NodeID())
}

type mesh = xdstest.Mesh

// recorder is an Applier that keeps every configuration it was given and
// can be told to refuse.
type recorder struct {
	mu      sync.Mutex
	cfgs    []engineConfig
	refuse  error
	applied chan struct{}
}

func newRecorder() *recorder { return &recorder{applied: make(chan struct{}, 1000)} }

func (r *recorder) Apply(cfg engineConfig) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.refuse != nil {
		return r.refuse
	}
	r.cfgs = append(r.cfgs, cfg)
	r.applied <- struct{}{}
	return nil
}

func (r *recorder) last() engineConfig {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.cfgs) == 0 {
		return engineConfig{}
	}
	return r.cfgs[len(r.cfgs)-1]
}

// runClient runs a client until the test ends or the returned stop is
// called (which waits for Run to return).
func runClient(t testing.TB, o Options) (*Client, func()) {
	t.Helper()
	if o.Node == nil {
		o.Node = testIdentity.Node()
	}
	if o.BackoffInitial == 0 {
		o.BackoffInitial = 20 * time.Millisecond
		o.BackoffMax = 200 * time.Millisecond
	}
	c, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { _ = c.Run(ctx); close(done) }()
	stop := func() { cancel(); <-done }
	t.Cleanup(stop)
	return c, stop
}

func waitFor(t testing.TB, what string, timeout time.Duration, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s", timeout, what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
