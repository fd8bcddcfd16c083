package xds

import (
	"errors"
	"maps"
	"testing"
)

// recordingApplier keeps each cluster's endpoints as the engine would and
// refuses what the test says; the real engine's paths are exercised by
// TestSotWReusesUnchangedResources and the envtest traffic tests.
type recordingApplier struct {
	eps       map[string][]endpoint
	refuseEps string
	refuseAll bool
}

func (r *recordingApplier) Apply(engineConfig) error {
	if r.refuseAll {
		return errors.New("refused as a whole")
	}
	return nil
}

func (r *recordingApplier) ApplyEndpoints(name string, eps []endpoint) error {
	if name == r.refuseEps {
		return errors.New("refused " + name)
	}
	r.eps[name] = eps
	return nil
}

// An endpoint update the engine refuses half-way, and then refuses as a
// whole, leaves every cluster with the endpoints it had: a NACKed update
// changes nothing.
func TestApplyTableRefusedLeavesEndpoints(t *testing.T) {
	old := map[string][]endpoint{"a": {{Address: "10.0.0.1:80"}}, "b": {{Address: "10.0.0.2:80"}}}
	prev := &table{clusters: map[string]*cluster{"a": {Name: "a", Endpoints: old["a"]}, "b": {Name: "b", Endpoints: old["b"]}}}
	next := &table{clusters: map[string]*cluster{
		"a": {Name: "a", Endpoints: []endpoint{{Address: "10.0.0.9:80"}}},
		"b": {Name: "b", Endpoints: []endpoint{{Address: "10.0.0.8:80"}}},
	}}
	for _, refuse := range []string{"a", "b"} { // map order: either may be applied first
		r := &recordingApplier{eps: maps.Clone(old), refuseEps: refuse, refuseAll: true}
		if err := applyTable(r, prev, next); err == nil {
			t.Fatalf("refusing %s: applyTable succeeded", refuse)
		}
		for n, want := range old {
			if got := r.eps[n]; len(got) != 1 || got[0].Address != want[0].Address {
				t.Errorf("refusing %s: cluster %s has %v after a refused update, want %v", refuse, n, got, want)
			}
		}
	}
}
