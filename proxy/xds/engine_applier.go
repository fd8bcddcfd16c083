package xds

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
	"time"

	"github.com/meshlet/meshlet/proxy/config"
)

// Engine is the L7 engine's run-time update API (package l7's Engine).
type Engine interface {
	// Update validates, compiles and swaps in a whole configuration.
	Update(cfg config.L7) error
	// UpdateEndpoints replaces one cluster's endpoints (EDS churn).
	UpdateEndpoints(cluster string, endpoints []config.Endpoint) error
}

// EngineApplier applies configurations to e: a change of endpoints only
// goes through UpdateEndpoints, anything else through Update.
func EngineApplier(e Engine) Applier { return engineApplier{e} }

type engineApplier struct{ e Engine }

func (a engineApplier) Apply(cfg config.L7) error { return a.e.Update(cfg) }

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
	for name, c := range tbl.clusters {
		if old := prev.clusters[name]; !slices.EqualFunc(old.Endpoints, c.Endpoints, endpointEqual) {
			if err := ea.ApplyEndpoints(name, c.Endpoints); err != nil {
				// The table may now be half updated: apply it as a whole.
				return a.Apply(tbl.cfg)
			}
		}
	}
	return nil
}

// sameShape reports whether a and b have the same clusters (apart from
// their endpoints) and the same services, ports and static parts.
func sameShape(a, b *table) bool {
	if len(a.clusters) != len(b.clusters) || len(a.cfg.Clusters) != len(b.cfg.Clusters) ||
		len(a.cfg.Services) != len(b.cfg.Services) || len(a.routes) != len(b.routes) {
		return false
	}
	for name, c := range b.clusters {
		o := a.clusters[name]
		if o == nil {
			return false
		}
		x, y := *o, *c
		x.Endpoints, y.Endpoints = nil, nil
		if !jsonEqual(x, y) {
			return false
		}
	}
	for rn, svcs := range b.routes {
		old, ok := a.routes[rn]
		// Route configurations are shared slices when unchanged.
		if !ok || len(old) != len(svcs) || len(svcs) > 0 && &old[0] != &svcs[0] {
			return false
		}
	}
	return slices.EqualFunc(a.cfg.Ports, b.cfg.Ports, func(x, y portConfig) bool { return x == y })
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

func jsonEqual(a, b any) bool {
	x, err1 := json.Marshal(a)
	y, err2 := json.Marshal(b)
	return err1 == nil && err2 == nil && string(x) == string(y)
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
