package ca

import (
	"fmt"
	"net/url"
	"strings"

	"k8s.io/apimachinery/pkg/util/validation"
)

// DefaultTrustDomain is the trust domain of a mesh that sets none (Istio's).
const DefaultTrustDomain = "cluster.local"

// Identity is a workload's identity: the service account it runs as.
type Identity struct {
	TrustDomain    string
	Namespace      string
	ServiceAccount string
}

// URI returns the identity's SPIFFE ID, spiffe://<trust domain>/ns/<ns>/sa/<sa>.
func (id Identity) URI() *url.URL {
	return &url.URL{Scheme: "spiffe", Host: id.TrustDomain, Path: "/ns/" + id.Namespace + "/sa/" + id.ServiceAccount}
}

// String returns the SPIFFE ID as text.
func (id Identity) String() string { return id.URI().String() }

// serviceAccountPrefix starts the user name of every service-account token.
const serviceAccountPrefix = "system:serviceaccount:"

// identityFromUsername maps a TokenReview user name
// (system:serviceaccount:<ns>:<sa>) to the identity in trustDomain.
func identityFromUsername(trustDomain, username string) (Identity, error) {
	rest, ok := strings.CutPrefix(username, serviceAccountPrefix)
	if !ok {
		return Identity{}, fmt.Errorf("user %q is not a service account", username)
	}
	ns, sa, ok := strings.Cut(rest, ":")
	if !ok || ns == "" || sa == "" || strings.Contains(sa, ":") {
		return Identity{}, fmt.Errorf("user %q is not a service account (want %s<namespace>:<name>)", username, serviceAccountPrefix)
	}
	return Identity{TrustDomain: trustDomain, Namespace: ns, ServiceAccount: sa}, nil
}

// ValidateTrustDomain checks that td can be the host of a SPIFFE ID.
func ValidateTrustDomain(td string) error {
	if td == "" {
		return fmt.Errorf("trust domain is empty")
	}
	if errs := validation.IsDNS1123Subdomain(td); len(errs) > 0 {
		return fmt.Errorf("trust domain %q: %s", td, strings.Join(errs, "; "))
	}
	return nil
}
