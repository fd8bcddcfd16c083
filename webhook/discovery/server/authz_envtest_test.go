package server

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/protobuf/proto"
	security "istio.io/api/security/v1beta1"
	typev1beta1 "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"

	"github.com/meshlet/meshlet/webhook/discovery/translate"
)

// inboundFilters returns the filter names of virtualInbound's chain for
// port (the HTTP filters inside its connection manager when it has one);
// nil when the listener or chain is missing.
func inboundFilters(m map[string]proto.Message, port uint32) []string {
	l, _ := m[translate.VirtualInbound].(*listenerv3.Listener)
	for _, fc := range l.GetFilterChains() {
		if fc.GetFilterChainMatch().GetDestinationPort().GetValue() != port {
			continue
		}
		names := []string{}
		for _, f := range fc.GetFilters() {
			names = append(names, f.GetName())
			hcm := &hcmv3.HttpConnectionManager{}
			if f.GetTypedConfig().MessageIs(hcm) && f.GetTypedConfig().UnmarshalTo(hcm) == nil {
				for _, hf := range hcm.GetHttpFilters() {
					names = append(names, hf.GetName())
				}
			}
		}
		return names
	}
	return nil
}

// waitEvent waits for a Warning Event of the discovery server on the object
// whose message contains want.
func waitEvent(t *testing.T, c *testCluster, kind, ns, name string, uid types.UID, want string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		evs, err := c.kube.CoreV1().Events(ns).List(context.Background(), metav1.ListOptions{FieldSelector: fields.Set{
			"involvedObject.name": name, "involvedObject.kind": kind}.String()})
		if err != nil {
			t.Fatal(err)
		}
		for _, e := range evs.Items {
			if e.Type == corev1.EventTypeWarning && e.Source.Component == EventComponent && strings.Contains(e.Message, want) &&
				e.InvolvedObject.UID == uid && e.InvolvedObject.APIVersion == "security.istio.io/v1" {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no Warning Event containing %q on %s %s/%s; events: %+v", want, kind, ns, name, evs.Items)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestEnvtestAuthorizationPolicy: a real API server, the discovery server
// and a raw ADS client of reviews-v1's proxy. Creating an
// AuthorizationPolicy puts the RBAC filter before the router of the inbound
// HTTP chain; deleting it takes it out again; a refused field is a
// Warning Event on the policy; a PeerAuthentication STRICT leaves only
// mutual TLS chains on the inbound listener.
func TestEnvtestAuthorizationPolicy(t *testing.T) {
	c := startCluster(t)
	ctx := context.Background()
	c.seedShop(t)
	client := dialADS(t, c.srv.XDSAddr().String(), testNode("10.1.0.1", "reviews-v1", "shop", nil), nil)
	plain := []string{"envoy.filters.network.http_connection_manager", "envoy.filters.http.fault", "envoy.filters.http.router"}
	withRBAC := []string{"envoy.filters.network.http_connection_manager", "envoy.filters.http.rbac", "envoy.filters.http.fault", "envoy.filters.http.router"}

	client.waitFor(t, resourcev3.ListenerType, "the inbound chain for 9080 without RBAC", func(m map[string]proto.Message) bool {
		return slices.Equal(inboundFilters(m, 9080), plain)
	})

	ap := mustCreate(t, c.istio.SecurityV1().AuthorizationPolicies("shop").Create, &securityv1.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "public-from-frontend"},
		Spec: security.AuthorizationPolicy{
			Selector: &typev1beta1.WorkloadSelector{MatchLabels: map[string]string{"app": "reviews"}},
			Rules: []*security.Rule{{
				From: []*security.Rule_From{{Source: &security.Source{Namespaces: []string{"frontend"}}}},
				To:   []*security.Rule_To{{Operation: &security.Operation{Methods: []string{"GET"}, Paths: []string{"/public"}}}},
			}, {
				From: []*security.Rule_From{{Source: &security.Source{RequestPrincipals: []string{"issuer/sub"}}}},
			}},
		}})
	client.waitFor(t, resourcev3.ListenerType, "the RBAC filter before the router", func(m map[string]proto.Message) bool {
		return slices.Equal(inboundFilters(m, 9080), withRBAC)
	})
	waitEvent(t, c, "AuthorizationPolicy", "shop", ap.Name, ap.UID, "spec.rules[1].from[0].source.requestPrincipals")

	mustCreate(t, c.istio.SecurityV1().PeerAuthentications("shop").Create, &securityv1.PeerAuthentication{
		ObjectMeta: metav1.ObjectMeta{Name: "default"},
		Spec:       security.PeerAuthentication{Mtls: &security.PeerAuthentication_MutualTLS{Mode: security.PeerAuthentication_MutualTLS_STRICT}}})
	client.waitFor(t, resourcev3.ListenerType, "STRICT: mutual TLS chains only, no plain-text default chain", func(m map[string]proto.Message) bool {
		l, _ := m[translate.VirtualInbound].(*listenerv3.Listener)
		if l == nil || l.GetDefaultFilterChain() != nil || len(l.GetFilterChains()) == 0 {
			return false
		}
		for _, fc := range l.GetFilterChains() {
			if fc.GetFilterChainMatch().GetTransportProtocol() != "tls" {
				return false
			}
		}
		return true
	})

	if err := c.istio.SecurityV1().AuthorizationPolicies("shop").Delete(ctx, ap.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	client.waitFor(t, resourcev3.ListenerType, "the inbound chain without RBAC again", func(m map[string]proto.Message) bool {
		return slices.Equal(inboundFilters(m, 9080), plain)
	})
	if n := client.repeatedNACKed(); n != 0 {
		t.Errorf("%d NACKed versions sent again", n)
	}
}
