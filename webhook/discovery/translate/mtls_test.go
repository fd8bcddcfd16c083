package translate

import (
	"testing"

	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
)

// TestTrustDomainSANs: the SPIFFE IDs a cluster expects of the service's
// meshed pods are in Inputs.TrustDomain (the CA's --trust-domain).
func TestTrustDomainSANs(t *testing.T) {
	in, p := loadCase(t, "testdata/cases/auto-mtls.yaml")
	in.TrustDomain = "corp.example"
	r := Compile(in).ForProxy(p)
	for _, c := range r.Clusters {
		if c.GetName() != "outbound|9080||details.shop.svc.cluster.local" {
			continue
		}
		u := &tlsv3.UpstreamTlsContext{}
		if err := c.GetTransportSocketMatches()[0].GetTransportSocket().GetTypedConfig().UnmarshalTo(u); err != nil {
			t.Fatal(err)
		}
		sans := u.GetCommonTlsContext().GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames()
		if len(sans) != 1 || sans[0].GetMatcher().GetExact() != "spiffe://corp.example/ns/shop/sa/details" {
			t.Fatalf("SANs %v, want spiffe://corp.example/ns/shop/sa/details", sans)
		}
		return
	}
	t.Fatal("no details cluster")
}
