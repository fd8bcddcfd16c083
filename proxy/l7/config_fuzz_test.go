package l7

import (
	"testing"

	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/proxy/config"
)

// FuzzLoad: arbitrary input never panics; whatever loads also validates and
// builds an engine.
func FuzzLoad(f *testing.F) {
	f.Add([]byte("services: [{name: s, hosts: [s], routes: [{name: r, timeout: 2s, retries: {attempts: 2, budget: {ratio: 0.2}}, fault: {abort: {httpStatus: 503, percent: 1}}, mirror: {cluster: a}, destinations: [{cluster: a, subset: v1, weight: 9}, {cluster: a, weight: 1}]}]}]\nclusters: [{name: a, loadBalancer: peak_ewma, endpoints: [{address: '127.0.0.1:1', labels: {v: a}}], subsets: [{name: v1, labels: {v: a}}], outlierDetection: {consecutive5xx: 3}}]"))
	f.Add([]byte("services: [{name: s, hosts: ['*'], routes: [{name: r, destinations: [{cluster: a}]}]}]\nclusters: [{name: a, endpoints: [{address: '127.0.0.1:1'}]}]"))
	f.Add([]byte("ports: [{port: 1, name: grpc-}]"))
	f.Add([]byte("{detection: {timeout: 1}}"))
	f.Add([]byte("clusters: [{name: a, endpoints: [{address: '[::1]:80'}], subsets: [{name: x, labels: {a: b}}]}]"))
	f.Add([]byte("- a\n- b"))
	f.Add([]byte("services: [{name: s, addresses: ['::/0'], routes: [{name: r, match: [{headers: {x: {present: true}}}], destinations: [{cluster: a}]}]}]\nclusters: [{name: a, endpoints: [{address: '127.0.0.1:1'}]}]"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := config.ParseL7(data)
		if err != nil {
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("loaded config fails Validate: %v", err)
		}
		// No DNS clusters here: New would resolve names (tests resolve nothing).
		for _, cl := range c.Clusters {
			if cl.DNS != nil || cl.HealthCheck != nil {
				return
			}
		}
		p, err := New(c, Options{AccessLog: &proctest.SyncBuf{}})
		if err != nil {
			t.Fatalf("New after valid Load: %v", err)
		}
		p.Close()
	})
}
