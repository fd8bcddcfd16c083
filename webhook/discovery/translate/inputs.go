package translate

import (
	"fmt"
	"net/netip"
	"strings"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
)

// DefaultDomain is the cluster's DNS domain suffix.
const DefaultDomain = "cluster.local"

// DefaultTrustDomain is the trust domain when Inputs names none (Istio's).
const DefaultTrustDomain = "cluster.local"

// GeneratorGRPC is the node metadata GENERATOR value of a proxyless grpc-go
// client.
const GeneratorGRPC = "grpc"

// Inputs is one consistent view of everything the translation reads. The
// slices are read only; the caller keeps ownership.
type Inputs struct {
	Services         []*corev1.Service
	EndpointSlices   []*discoveryv1.EndpointSlice
	Pods             []*corev1.Pod
	Namespaces       []*corev1.Namespace
	VirtualServices  []*networkingv1.VirtualService
	DestinationRules []*networkingv1.DestinationRule
	ServiceEntries   []*networkingv1.ServiceEntry
	Sidecars         []*networkingv1.Sidecar
	// Security are the AuthorizationPolicies and PeerAuthentications; its
	// RootNamespace is ignored (RootNamespace below is used).
	Security SecurityInputs
	// Domain is the DNS suffix (default DefaultDomain).
	Domain string
	// RootNamespace holds mesh-wide Sidecars, AuthorizationPolicies and
	// PeerAuthentications (Istio's root namespace; default
	// DefaultRootNamespace).
	RootNamespace string
	// TrustDomain is the SPIFFE trust domain of workload identities (the
	// CA's --trust-domain; default DefaultTrustDomain): the SPIFFE IDs a
	// client sidecar expects of a service's pods.
	TrustDomain string
}

// Proxy is the node a set of resources is built for.
type Proxy struct {
	// ID is node.id.
	ID string
	// IP, Name and Namespace come from the node id (and metadata).
	IP        string
	Name      string
	Namespace string
	// Labels are the pod's labels (metadata LABELS, or the Pod's when known).
	Labels map[string]string
	// Generator is node.metadata.GENERATOR ("" for the sidecar, "grpc").
	Generator string
}

// ParseNodeID parses Istio's node id `sidecar~POD_IP~POD.NS~NS.svc.DOMAIN`.
func ParseNodeID(id string) (Proxy, error) {
	parts := strings.Split(id, "~")
	if len(parts) != 4 {
		return Proxy{}, fmt.Errorf("node.id %q: want TYPE~POD_IP~POD.NAMESPACE~NAMESPACE.svc.DOMAIN (4 fields separated by ~)", id)
	}
	if parts[0] != "sidecar" {
		return Proxy{}, fmt.Errorf("node.id %q: type %q is not sidecar", id, parts[0])
	}
	if _, err := netip.ParseAddr(parts[1]); err != nil {
		return Proxy{}, fmt.Errorf("node.id %q: %q is not an IP address", id, parts[1])
	}
	name, ns, ok := strings.Cut(parts[2], ".")
	if !ok || name == "" || ns == "" {
		return Proxy{}, fmt.Errorf("node.id %q: %q is not POD.NAMESPACE", id, parts[2])
	}
	return Proxy{ID: id, IP: parts[1], Name: name, Namespace: ns}, nil
}

// NodeID builds the node id of a pod.
func NodeID(ip, pod, namespace, domain string) string {
	if domain == "" {
		domain = DefaultDomain
	}
	return fmt.Sprintf("sidecar~%s~%s.%s~%s.svc.%s", ip, pod, namespace, namespace, domain)
}

// Warning is a resource (or part of one) that was not translated.
type Warning struct {
	// Kind, Namespace, Name identify the object.
	Kind      string
	Namespace string
	Name      string
	UID       string
	// Reason is UnsupportedField or InvalidField.
	Reason string
	// Message names the field and value.
	Message string
}

func (w Warning) String() string {
	return fmt.Sprintf("%s %s/%s: %s: %s", w.Kind, w.Namespace, w.Name, w.Reason, w.Message)
}

// Reasons of a Warning.
const (
	ReasonUnsupported = "UnsupportedField"
	ReasonInvalid     = "InvalidField"
)
