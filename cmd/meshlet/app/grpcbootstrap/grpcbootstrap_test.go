package grpcbootstrap

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
)

func execute(t *testing.T, args ...string) (string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	cmd := New(cli.Streams{In: strings.NewReader(""), Out: &out, Err: &errOut})
	cmd.SetArgs(args)
	cmd.SetOut(&errOut)
	cmd.SetErr(&errOut)
	cmd.SilenceUsage, cmd.SilenceErrors = true, true
	err := cmd.Execute()
	return out.String(), err
}

// TestWritesBootstrap: the file gRPC reads names the discovery service and
// the node as the control plane expects (Istio's id, GENERATOR grpc).
func TestWritesBootstrap(t *testing.T) {
	t.Setenv("POD_NAME", "echo-7d9f")
	t.Setenv("POD_NAMESPACE", "grpc")
	t.Setenv("INSTANCE_IP", "10.244.0.7")
	path := filepath.Join(t.TempDir(), "bootstrap.json")
	if _, err := execute(t, "--discovery-address=istiod.meshlet-system.svc:15010", "--out="+path); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Servers []struct {
			URI   string              `json:"server_uri"`
			Creds []map[string]string `json:"channel_creds"`
		} `json:"xds_servers"`
		Node struct {
			ID       string            `json:"id"`
			Metadata map[string]string `json:"metadata"`
		} `json:"node"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatalf("%v:\n%s", err, b)
	}
	if len(doc.Servers) != 1 || doc.Servers[0].URI != "istiod.meshlet-system.svc:15010" || doc.Servers[0].Creds[0]["type"] != "insecure" {
		t.Errorf("xds_servers: %+v", doc.Servers)
	}
	if want := "sidecar~10.244.0.7~echo-7d9f.grpc~grpc.svc.cluster.local"; doc.Node.ID != want {
		t.Errorf("node id %q, want %q", doc.Node.ID, want)
	}
	if doc.Node.Metadata["GENERATOR"] != "grpc" || doc.Node.Metadata["NAMESPACE"] != "grpc" {
		t.Errorf("node metadata %v", doc.Node.Metadata)
	}
}

// TestBadInputNamed: every bad input is reported, naming what it is.
func TestBadInputNamed(t *testing.T) {
	t.Setenv("POD_NAME", "")
	t.Setenv("POD_NAMESPACE", "Bad_NS")
	t.Setenv("INSTANCE_IP", "10.0.0")
	_, err := execute(t, "--discovery-address=istiod", "--out=-")
	if err == nil {
		t.Fatal("bad input accepted")
	}
	for _, w := range []string{`discovery address "istiod"`, `pod name (POD_NAME) ""`, `namespace (POD_NAMESPACE) "Bad_NS"`, `pod IP (INSTANCE_IP) "10.0.0"`} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %s:\n%v", w, err)
		}
	}
}
