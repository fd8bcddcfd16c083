package chart

import (
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
)

// TestCAValues: by default the discovery pods run the mesh CA on 15012 (in
// the pod's namespace, serving for the discovery Service's names), the
// Service exposes it and the CA's RBAC is rendered; discovery.ca.enabled=false
// passes --ca-addr=- and renders neither port nor RBAC. The RBAC itself is
// exercised against a real API server by webhook/ca's TestChartRBACIsEnough.
func TestCAValues(t *testing.T) {
	for _, on := range []bool{true, false} {
		var vals map[string]any
		if !on {
			vals = map[string]any{"discovery": map[string]any{"ca": map[string]any{"enabled": false}}}
		}
		m, err := Render(chartDir, vals)
		if err != nil {
			t.Fatal(err)
		}
		objs := objects(t, m)
		var dep appsv1.Deployment
		if !find(t, objs, "Deployment", "meshlet-discovery", &dep) {
			t.Fatal("no Deployment meshlet-discovery")
		}
		c := dep.Spec.Template.Spec.Containers[0]
		var svc corev1.Service
		if !find(t, objs, "Service", "istiod", &svc) {
			t.Fatal("no Service istiod")
		}
		svcHas := slices.ContainsFunc(svc.Spec.Ports, func(p corev1.ServicePort) bool { return p.Port == 15012 && p.Name == "tls-ca" })
		podHas := slices.ContainsFunc(c.Ports, func(p corev1.ContainerPort) bool { return p.ContainerPort == 15012 && p.Name == "tls-ca" })
		nsEnv := slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool {
			return e.Name == "POD_NAMESPACE" && e.ValueFrom != nil && e.ValueFrom.FieldRef.FieldPath == "metadata.namespace"
		})
		var role rbacv1.Role
		hasRBAC := find(t, objs, "Role", "meshlet-discovery-ca", &role)
		if on {
			for _, want := range []string{"--ca-addr=:15012", "--ca-service=istiod", "--trust-domain=cluster.local", "--workload-cert-ttl=24h", "--max-workload-cert-ttl=2160h"} {
				if !slices.Contains(c.Args, want) {
					t.Errorf("discovery args %v lack %s", c.Args, want)
				}
			}
			if !svcHas || !podHas || !nsEnv || !hasRBAC {
				t.Errorf("CA on: Service port %v, container port %v, POD_NAMESPACE %v, RBAC %v; want all", svcHas, podHas, nsEnv, hasRBAC)
			}
			continue
		}
		if !slices.Contains(c.Args, "--ca-addr=-") || svcHas || podHas || hasRBAC || strings.Contains(m, "templates/ca.yaml") {
			t.Errorf("CA off: args %v, Service port %v, container port %v, RBAC %v; want --ca-addr=- and nothing else", c.Args, svcHas, podHas, hasRBAC)
		}
	}
}
