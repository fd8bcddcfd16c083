package inject

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
)

// TestInjectIdentity: an injected sidecar gets Istio's projected token
// (audience istio-ca, /var/run/secrets/tokens/istio-token) and the mesh root
// ConfigMap at /var/run/secrets/istio, both read-only in istio-proxy only,
// and the pod is labelled security.istio.io/tlsMode=istio; uninject removes
// all of it and restores a label value the pod had before.
func TestInjectIdentity(t *testing.T) {
	cfg := DefaultConfig()
	for _, prior := range []string{"", "disabled"} {
		in := testPod()
		if prior != "" {
			in.Labels[LabelTLSMode] = prior
		}
		orig := in.DeepCopy()
		out, d, err := Inject(in, Namespace{Name: "shop"}, &cfg, Options{AutoNativeSidecar: true})
		if err != nil || !d.Injected {
			t.Fatalf("Inject: %v %+v", err, d)
		}
		if out.Labels[LabelTLSMode] != TLSModeIstio {
			t.Errorf("label %s=%q, want %q", LabelTLSMode, out.Labels[LabelTLSMode], TLSModeIstio)
		}
		var token, root *corev1.Volume
		for i := range out.Spec.Volumes {
			switch v := &out.Spec.Volumes[i]; v.Name {
			case VolumeToken:
				token = v
			case VolumeCARoot:
				root = v
			}
		}
		if token == nil || token.Projected == nil || len(token.Projected.Sources) != 1 {
			t.Fatalf("no projected token volume %s: %+v", VolumeToken, out.Spec.Volumes)
		}
		if sat := token.Projected.Sources[0].ServiceAccountToken; sat == nil || sat.Audience != "istio-ca" || sat.Path != "istio-token" {
			t.Errorf("token projection %+v, want audience istio-ca, path istio-token", sat)
		}
		if root == nil || root.ConfigMap == nil || root.ConfigMap.Name != "istio-ca-root-cert" {
			t.Errorf("root volume %+v, want ConfigMap istio-ca-root-cert", root)
		}
		proxy := out.Spec.InitContainers[slices.IndexFunc(out.Spec.InitContainers, func(c corev1.Container) bool { return c.Name == ContainerProxy })]
		for _, want := range []corev1.VolumeMount{
			{Name: VolumeToken, MountPath: "/var/run/secrets/tokens", ReadOnly: true},
			{Name: VolumeCARoot, MountPath: "/var/run/secrets/istio", ReadOnly: true},
		} {
			if !slices.Contains(proxy.VolumeMounts, want) {
				t.Errorf("istio-proxy mounts %+v lack %+v", proxy.VolumeMounts, want)
			}
		}
		for _, c := range out.Spec.Containers {
			if slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.Name == VolumeToken }) {
				t.Errorf("app container %s mounts the CA token", c.Name)
			}
		}
		back, err := Uninject(out)
		if err != nil {
			t.Fatal(err)
		}
		if !apiequality.Semantic.DeepEqual(back, orig) {
			t.Errorf("prior label %q: uninject is not exact: labels %v, volumes %v", prior, back.Labels, back.Spec.Volumes)
		}
	}
}
