package xds

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/protobuf/types/known/structpb"
)

// Identity is who the proxy is, as the control plane sees it: the pod the
// sidecar runs in. The agent gets these from the downward API (POD_NAME,
// POD_NAMESPACE, INSTANCE_IP, SERVICE_ACCOUNT) and the injector adds the
// pod's labels (ISTIO_METAJSON_LABELS) and other ISTIO_META_* values.
type Identity struct {
	// PodName and Namespace name the pod. Required.
	PodName, Namespace string
	// IP is the pod's IP (INSTANCE_IP). Required.
	IP string
	// ServiceAccount is the pod's service account.
	ServiceAccount string
	// Labels are the pod's labels (subset selection, Sidecar scoping).
	Labels map[string]string
	// DNSDomain is the cluster's DNS domain; empty: "cluster.local".
	DNSDomain string
	// Meta holds further node metadata (string values), e.g. from
	// ISTIO_META_* variables (INTERCEPTION_MODE, APP_CONTAINERS).
	Meta map[string]string
}

// Istio's node metadata keys that this package sets.
const (
	MetaNamespace      = "NAMESPACE"
	MetaName           = "NAME"
	MetaServiceAccount = "SERVICE_ACCOUNT"
	MetaLabels         = "LABELS"
	MetaInstanceIPs    = "INSTANCE_IPS"
	MetaDNSDomain      = "DNS_DOMAIN"
)

// NodeID returns Istio's sidecar node id:
// sidecar~POD_IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN.
func (id Identity) NodeID() string {
	return fmt.Sprintf("sidecar~%s~%s.%s~%s.svc.%s", id.IP, id.PodName, id.Namespace, id.Namespace, id.domain())
}

func (id Identity) domain() string {
	if id.DNSDomain == "" {
		return "cluster.local"
	}
	return id.DNSDomain
}

// Validate reports every missing or malformed field, each by the
// environment variable it normally comes from.
func (id Identity) Validate() error {
	var errs []string
	if id.PodName == "" {
		errs = append(errs, "POD_NAME is empty")
	}
	if id.Namespace == "" {
		errs = append(errs, "POD_NAMESPACE is empty")
	}
	if _, err := netip.ParseAddr(id.IP); err != nil {
		errs = append(errs, fmt.Sprintf("INSTANCE_IP %q is not an IP address", id.IP))
	}
	for _, s := range []string{id.PodName, id.Namespace, id.DNSDomain} {
		if strings.Contains(s, "~") {
			errs = append(errs, fmt.Sprintf("%q must not contain '~' (the node id separator)", s))
		}
	}
	if len(errs) > 0 {
		return fmt.Errorf("proxy identity: %s", strings.Join(errs, "; "))
	}
	return nil
}

// Node returns the xDS node: Istio's id and metadata (NAMESPACE, NAME,
// SERVICE_ACCOUNT, LABELS, INSTANCE_IPS, DNS_DOMAIN, plus Meta), with
// cluster set to the workload's service-account-qualified name as Envoy
// requires a non-empty one.
func (id Identity) Node() *corev3.Node {
	fields := map[string]*structpb.Value{
		MetaNamespace:   structpb.NewStringValue(id.Namespace),
		MetaName:        structpb.NewStringValue(id.PodName),
		MetaInstanceIPs: structpb.NewStringValue(id.IP),
		MetaDNSDomain:   structpb.NewStringValue(id.domain()),
	}
	if id.ServiceAccount != "" {
		fields[MetaServiceAccount] = structpb.NewStringValue(id.ServiceAccount)
	}
	labels := map[string]*structpb.Value{}
	for k, v := range id.Labels {
		labels[k] = structpb.NewStringValue(v)
	}
	fields[MetaLabels] = structpb.NewStructValue(&structpb.Struct{Fields: labels})
	for k, v := range id.Meta {
		if _, set := fields[k]; !set {
			fields[k] = structpb.NewStringValue(v)
		}
	}
	cluster := id.Namespace
	if id.ServiceAccount != "" {
		cluster = id.ServiceAccount + "." + id.Namespace
	}
	return &corev3.Node{
		Id:            id.NodeID(),
		Cluster:       cluster,
		Metadata:      &structpb.Struct{Fields: fields},
		UserAgentName: "meshlet",
	}
}

// IdentityFromEnv reads the identity from environment variables the way
// the injected sidecar gets them: POD_NAME, POD_NAMESPACE, INSTANCE_IP,
// SERVICE_ACCOUNT, ISTIO_META_DNS_DOMAIN, ISTIO_METAJSON_LABELS (a JSON
// object) and every other ISTIO_META_NAME=value as metadata NAME. getenv
// is os.Getenv in the command and a map in tests; environ lists the
// variables (os.Environ).
func IdentityFromEnv(getenv func(string) string, environ []string) (Identity, error) {
	id := Identity{
		PodName:        getenv("POD_NAME"),
		Namespace:      getenv("POD_NAMESPACE"),
		IP:             getenv("INSTANCE_IP"),
		ServiceAccount: getenv("SERVICE_ACCOUNT"),
		DNSDomain:      getenv("ISTIO_META_DNS_DOMAIN"),
		Meta:           map[string]string{},
	}
	if raw := getenv("ISTIO_METAJSON_LABELS"); raw != "" {
		if err := json.Unmarshal([]byte(raw), &id.Labels); err != nil {
			return Identity{}, fmt.Errorf("ISTIO_METAJSON_LABELS: invalid value %q (want a JSON object of strings): %w", raw, err)
		}
	}
	for _, kv := range environ {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || !strings.HasPrefix(k, "ISTIO_META_") || k == "ISTIO_META_DNS_DOMAIN" {
			continue
		}
		id.Meta[strings.TrimPrefix(k, "ISTIO_META_")] = v
	}
	if err := id.Validate(); err != nil {
		return Identity{}, err
	}
	return id, nil
}
