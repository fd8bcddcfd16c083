package xds

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
)

// Engine is the L7 engine's run-time update API (package l7's Engine).
type Engine interface {
	// UpdateShared validates, compiles and swaps in a whole
	// configuration, which the client never modifies afterwards (what is
	// the same memory as in the running one is not validated or compiled
	// again).
	UpdateShared(cfg config.L7) error
	// UpdateEndpoints replaces one cluster's endpoints (EDS churn).
	UpdateEndpoints(cluster string, endpoints []config.Endpoint) error
}

// EngineApplier applies configurations to e: a change of endpoints only
// goes through UpdateEndpoints, anything else through UpdateShared (the
// client builds every configuration anew, sharing the translation of the
// resources that did not change, and never edits one it handed over).
func EngineApplier(e Engine) Applier { return engineApplier{e} }

type engineApplier struct{ e Engine }

func (a engineApplier) Apply(cfg config.L7) error { return a.e.UpdateShared(cfg) }

func (a engineApplier) ApplyEndpoints(cluster string, eps []config.Endpoint) error {
	return a.e.UpdateEndpoints(cluster, eps)
}

// endpointsApplier is an Applier with a cheap path for endpoint changes.
type endpointsApplier interface {
	ApplyEndpoints(cluster string, eps []endpoint) error
}

// applyTable hands tbl to the engine: when it differs from prev only in
// the endpoints of clusters both have (EDS churn) and the engine has the
// cheap path, through UpdateEndpoints per changed cluster; otherwise as a
// whole.
func applyTable(a Applier, prev, tbl *table) error {
	ea, ok := a.(endpointsApplier)
	if !ok || prev == nil || !sameShape(prev, tbl) {
		return a.Apply(tbl.cfg)
	}
	var done []string
	for name, c := range tbl.clusters {
		if old := prev.clusters[name]; !slices.EqualFunc(old.Endpoints, c.Endpoints, endpointEqual) {
			if err := ea.ApplyEndpoints(name, c.Endpoints); err != nil {
				// The table is now half updated: apply it as a whole, and
				// when that fails too put back what the running
				// configuration had, so a refused update changes nothing.
				werr := a.Apply(tbl.cfg)
				if werr != nil {
					for _, n := range done {
						_ = ea.ApplyEndpoints(n, prev.clusters[n].Endpoints)
					}
				}
				return werr
			}
			done = append(done, name)
		}
	}
	return nil
}

// sameShape reports whether b was built from the same clusters,
// listeners and route configurations as a (only endpoints differ) and
// holds the same clusters.
func sameShape(a, b *table) bool {
	for _, t := range []string{ClusterType, ListenerType, RouteType} {
		if a.src[t] != b.src[t] {
			return false
		}
	}
	if len(a.clusters) != len(b.clusters) || len(a.warmingRoutes) != len(b.warmingRoutes) {
		return false
	}
	for name := range b.clusters {
		if a.clusters[name] == nil {
			return false
		}
	}
	return true
}

func endpointEqual(x, y endpoint) bool {
	if x.Address != y.Address || len(x.Labels) != len(y.Labels) {
		return false
	}
	for k, v := range x.Labels {
		if y.Labels[k] != v {
			return false
		}
	}
	return true
}

// WaitReady waits until a complete configuration serves, ctx ends or d
// passes, and returns Ready's answer.
func (c *Client) WaitReady(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-c.ready:
	case <-ctx.Done():
	case <-t.C:
	}
	if err := c.Ready(); err != nil {
		return fmt.Errorf("after %v: %w", d, err)
	}
	return nil
}
