package proxystatus

import (
	"bytes"
	"strings"
	"testing"

	"github.com/meshlet/meshlet/webhook/discovery/server"
)

// TestRender: one row per proxy across replicas, its state per type, the
// replica, and each NACK's error after the table.
func TestRender(t *testing.T) {
	cds := "type.googleapis.com/envoy.config.cluster.v3.Cluster"
	rds := "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
	docs := []server.SyncStatus{
		{Replica: "discovery-a", Proxies: []server.ProxyStatus{{ID: "sidecar~10.0.0.2~web-1.shop~shop.svc.cluster.local", Replica: "discovery-a",
			Types: map[string]*server.TypeStatus{cds: {State: server.StateSynced}, rds: {State: server.StateNACK, Error: "RouteConfiguration 80: hash_policy: not supported"}}}}},
		{Replica: "discovery-b", Proxies: []server.ProxyStatus{{ID: "sidecar~10.0.0.1~api-1.shop~shop.svc.cluster.local", Replica: "discovery-b", Delta: true,
			Types: map[string]*server.TypeStatus{cds: {State: server.StateStale}}}}},
	}
	var b bytes.Buffer
	if err := Render(&b, docs); err != nil {
		t.Fatal(err)
	}
	got := b.String()
	lines := strings.Split(strings.TrimSpace(got), "\n")
	if len(lines) != 4 || !strings.HasPrefix(lines[1], "api-1.shop") || !strings.Contains(lines[1], "STALE") ||
		!strings.Contains(lines[1], "discovery-b") || !strings.Contains(lines[1], "delta") ||
		!strings.HasPrefix(lines[2], "web-1.shop") || !strings.Contains(lines[2], "NACK") ||
		lines[3] != "NACK web-1.shop RDS: RouteConfiguration 80: hash_policy: not supported" {
		t.Fatalf("table:\n%s", got)
	}
}
