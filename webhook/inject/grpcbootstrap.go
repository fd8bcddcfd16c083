package inject

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// GRPCNode identifies a proxyless gRPC client to the discovery service.
type GRPCNode struct {
	// PodName, Namespace and IP are the pod's (downward API).
	PodName, Namespace, IP string
	// ClusterDomain is the cluster's DNS domain; empty: cluster.local.
	ClusterDomain string
}

// ID is the node id in Istio's form, sidecar~IP~POD.NS~NS.svc.DOMAIN.
func (n GRPCNode) ID() string {
	d := n.ClusterDomain
	if d == "" {
		d = "cluster.local"
	}
	return fmt.Sprintf("sidecar~%s~%s.%s~%s.svc.%s", n.IP, n.PodName, n.Namespace, n.Namespace, d)
}

// GRPCBootstrap renders the xDS bootstrap file gRPC reads from
// GRPC_XDS_BOOTSTRAP (gRFC A27): one plaintext xDS server, the discovery
// service at discoveryAddress (host:port), and the node with the metadata
// GENERATOR: grpc that marks a proxyless client. Every problem of the input
// is reported, each naming the field and the value.
func GRPCBootstrap(discoveryAddress string, node GRPCNode) ([]byte, error) {
	var errs []error
	bad := func(field, value, problem string) {
		errs = append(errs, fmt.Errorf("%s %q: %s", field, value, problem))
	}
	if err := checkHostPort(discoveryAddress); err != nil {
		bad("discovery address", discoveryAddress, err.Error())
	}
	if msgs := validation.IsDNS1123Subdomain(node.PodName); len(msgs) > 0 {
		bad("pod name (POD_NAME)", node.PodName, strings.Join(msgs, "; "))
	}
	if msgs := validation.IsDNS1123Label(node.Namespace); len(msgs) > 0 {
		bad("namespace (POD_NAMESPACE)", node.Namespace, strings.Join(msgs, "; "))
	}
	if _, err := netip.ParseAddr(node.IP); err != nil {
		bad("pod IP (INSTANCE_IP)", node.IP, "not an IP address")
	}
	if node.ClusterDomain != "" {
		if msgs := validation.IsDNS1123Subdomain(node.ClusterDomain); len(msgs) > 0 {
			bad("cluster domain", node.ClusterDomain, strings.Join(msgs, "; "))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	type server struct {
		URI            string              `json:"server_uri"`
		ChannelCreds   []map[string]string `json:"channel_creds"`
		ServerFeatures []string            `json:"server_features"`
	}
	doc := struct {
		Servers []server `json:"xds_servers"`
		Node    struct {
			ID       string            `json:"id"`
			Metadata map[string]string `json:"metadata"`
		} `json:"node"`
	}{
		Servers: []server{{URI: discoveryAddress, ChannelCreds: []map[string]string{{"type": "insecure"}}, ServerFeatures: []string{"xds_v3"}}},
	}
	doc.Node.ID = node.ID()
	doc.Node.Metadata = map[string]string{
		"GENERATOR":    "grpc",
		"NAME":         node.PodName,
		"NAMESPACE":    node.Namespace,
		"INSTANCE_IPS": node.IP,
	}
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}
