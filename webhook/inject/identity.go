package inject

import (
	corev1 "k8s.io/api/core/v1"
)

// Workload identity (webhook/ca, proxy/identity): what the proxy needs to
// obtain its certificate, with Istio's names and paths so Istio-style pod
// specs and tooling work unchanged.
const (
	// VolumeToken is the projected service-account token the agent sends to
	// the CA (audience CATokenAudience).
	VolumeToken = "istio-token"
	// TokenDir is where VolumeToken is mounted; the token is TokenDir/istio-token.
	TokenDir = "/var/run/secrets/tokens"
	// CATokenAudience is the audience the CA checks (Istio's).
	CATokenAudience = "istio-ca"
	// VolumeCARoot holds the mesh's root certificates: the ConfigMap
	// istio-ca-root-cert the CA publishes in every namespace.
	VolumeCARoot = "istiod-ca-cert"
	// CARootDir is where VolumeCARoot is mounted (root-cert.pem).
	CARootDir = "/var/run/secrets/istio"
	// CARootConfigMap is the ConfigMap VolumeCARoot projects.
	CARootConfigMap = "istio-ca-root-cert"
	// LabelTLSMode marks a meshed pod whose proxy accepts mutual TLS
	// (Istio's label; clients use it to choose mTLS for its endpoints).
	LabelTLSMode = "security.istio.io/tlsMode"
	// TLSModeIstio is LabelTLSMode's value on injected sidecars.
	TLSModeIstio = "istio"
)

// tokenExpirationSeconds is the projected token's lifetime (Istio's 12h);
// kubelet renews it at 80%.
const tokenExpirationSeconds = 43200

// identityVolumes are the pod volumes the proxy's identity needs. Without
// a CA (noCA) the root ConfigMap is optional: nothing publishes it, and a
// pod must not wait for it.
func identityVolumes(noCA bool) []corev1.Volume {
	exp := int64(tokenExpirationSeconds)
	return []corev1.Volume{
		{Name: VolumeToken, VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
			Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{
				Audience: CATokenAudience, ExpirationSeconds: &exp, Path: "istio-token",
			}}},
		}}},
		{Name: VolumeCARoot, VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{
			LocalObjectReference: corev1.LocalObjectReference{Name: CARootConfigMap},
			Optional:             optional(noCA),
		}}},
	}
}

// identityMounts are the proxy container's mounts of identityVolumes.
func identityMounts() []corev1.VolumeMount {
	return []corev1.VolumeMount{
		{Name: VolumeToken, MountPath: TokenDir, ReadOnly: true},
		{Name: VolumeCARoot, MountPath: CARootDir, ReadOnly: true},
	}
}

// setServiceAccount names the service account "default" when the pod names
// none. The API server's ServiceAccount admission does the same before any
// webhook sees the pod, but a projected token is refused at validation
// without it, so a manifest injected by `meshlet inject` (or an API server
// without that admission plugin) must carry it. Recorded for Uninject.
func setServiceAccount(pod *corev1.Pod, st *Status) {
	if pod.Spec.ServiceAccountName == "" {
		pod.Spec.ServiceAccountName = "default"
		st.ServiceAccountName = true
	}
}

// setLabel sets label k to v on pod, recording the previous value in st so
// Uninject restores it.
func setLabel(pod *corev1.Pod, st *Status, k, v string) {
	if old, ok := pod.Labels[k]; ok && old == v {
		return
	}
	if st.Labels == nil {
		st.Labels = map[string]*string{}
	}
	if _, recorded := st.Labels[k]; !recorded {
		if old, ok := pod.Labels[k]; ok {
			st.Labels[k] = &old
		} else {
			st.Labels[k] = nil
		}
	}
	if pod.Labels == nil {
		pod.Labels = map[string]string{}
	}
	pod.Labels[k] = v
}

// restoreLabels undoes setLabel.
func restoreLabels(pod *corev1.Pod, st *Status) {
	for k, v := range st.Labels {
		if v == nil {
			delete(pod.Labels, k)
		} else {
			pod.Labels[k] = *v
		}
	}
	if len(pod.Labels) == 0 {
		pod.Labels = nil
	}
}

// optional is a ConfigMap volume's Optional: set only when true, so the
// usual volume stays as Istio writes it.
func optional(b bool) *bool {
	if !b {
		return nil
	}
	return &b
}
