package inject

import (
	"encoding/json"
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func intstrPort(p int) intstr.IntOrString { return intstr.FromInt32(int32(p)) }

// Status is the JSON of the sidecar.istio.io/status annotation: everything
// injection added, so Uninject is exact. The first five fields are Istio's,
// so Istio tooling recognizes an injected pod.
type Status struct {
	InitContainers   []string `json:"initContainers"`
	Containers       []string `json:"containers"`
	Volumes          []string `json:"volumes"`
	ImagePullSecrets []string `json:"imagePullSecrets"`
	Revision         string   `json:"revision"`
	// NativeSidecar is true when istio-proxy is a native sidecar.
	NativeSidecar bool `json:"nativeSidecar"`
	// Annotations maps each annotation injection set to its previous value
	// (null: it was absent).
	Annotations map[string]*string `json:"annotations,omitempty"`
	// Labels maps each label injection set to its previous value (null: it
	// was absent).
	Labels map[string]*string `json:"labels,omitempty"`
	// ServiceAccountName is true when injection set spec.serviceAccountName
	// (to "default", for the projected token; see identity.go).
	ServiceAccountName bool `json:"serviceAccountName,omitempty"`
	// EmptyFields is set by `meshlet inject` (package manifest), never by
	// Inject: pod template fields the manifest held as an explicit empty
	// list or map ("spec.volumes") or as null ("metadata=null"), so
	// uninject can write them back as they were.
	EmptyFields []string `json:"emptyFields,omitempty"`
	// Templates are the injection templates the pod selected
	// (inject.istio.io/templates); absent for the config's defaults.
	Templates []string `json:"templates,omitempty"`
	// Overrides are the pod's own containers merged over injected ones.
	Overrides []Override `json:"overrides,omitempty"`
	// AppEnv and AppVolumeMounts name, per app container, the env
	// variables and volume mounts injection added to it.
	AppEnv          map[string][]string `json:"appEnv,omitempty"`
	AppVolumeMounts map[string][]string `json:"appVolumeMounts,omitempty"`
}

// ParseStatus reads the status annotation of pod; ok is false when the pod
// is not injected.
func ParseStatus(pod *corev1.Pod) (st Status, ok bool, err error) {
	v, ok := pod.Annotations[AnnotationStatus]
	if !ok {
		return st, false, nil
	}
	if err := json.Unmarshal([]byte(v), &st); err != nil {
		return st, true, &AnnotationError{Key: AnnotationStatus, Value: v, Problem: "not meshlet's status JSON: " + err.Error()}
	}
	return st, true, nil
}

// Uninject returns a copy of pod without what injection added, as recorded
// in its status annotation; a pod without one is returned unchanged. pod is
// never modified.
func Uninject(pod *corev1.Pod) (*corev1.Pod, error) {
	if pod == nil {
		return nil, fmt.Errorf("uninject: nil pod")
	}
	out := pod.DeepCopy()
	st, ok, err := ParseStatus(pod)
	if err != nil || !ok {
		return out, err
	}
	drop := func(names []string) func(corev1.Container) bool {
		return func(c corev1.Container) bool { return slices.Contains(names, c.Name) }
	}
	out.Spec.InitContainers = slices.DeleteFunc(out.Spec.InitContainers, drop(st.InitContainers))
	out.Spec.Containers = slices.DeleteFunc(out.Spec.Containers, drop(st.Containers))
	out.Spec.Volumes = slices.DeleteFunc(out.Spec.Volumes, func(v corev1.Volume) bool { return slices.Contains(st.Volumes, v.Name) })
	restoreApps(out, &st)
	if err := restoreOverrides(out, &st); err != nil {
		return nil, err
	}
	for k, v := range st.Annotations {
		if v == nil {
			delete(out.Annotations, k)
		} else {
			out.Annotations[k] = *v
		}
	}
	delete(out.Annotations, AnnotationStatus)
	restoreLabels(out, &st)
	if st.ServiceAccountName {
		out.Spec.ServiceAccountName = ""
	}
	if len(out.Annotations) == 0 {
		out.Annotations = nil
	}
	if len(out.Spec.InitContainers) == 0 {
		out.Spec.InitContainers = nil
	}
	if len(out.Spec.Volumes) == 0 {
		out.Spec.Volumes = nil
	}
	return out, nil
}
