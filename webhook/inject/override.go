package inject

import (
	"encoding/json"
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/strategicpatch"
)

// Override is a container the pod itself declared under the name of an
// injected one (istio-proxy, istio-init, ...): injection merged it over the
// injected container and records it here, as declared, so that Uninject
// puts it back exactly.
type Override struct {
	// Init is true for a container of spec.initContainers.
	Init bool `json:"init,omitempty"`
	// Index is its position in that list.
	Index int `json:"index"`
	// Container is the pod's container as declared (JSON).
	Container json.RawMessage `json:"container"`
}

// takeOverrides removes from pod the containers named like an injected one
// and records them in st. gatewayAt is the position of the pod's own
// istio-proxy among the containers (-1: none there).
func takeOverrides(pod *corev1.Pod, injected []string, st *Status) (map[string]corev1.Container, int, error) {
	own := map[string]corev1.Container{}
	gatewayAt := -1
	for _, l := range []struct {
		init bool
		cs   *[]corev1.Container
	}{{true, &pod.Spec.InitContainers}, {false, &pod.Spec.Containers}} {
		for i, c := range *l.cs {
			if !slices.Contains(injected, c.Name) {
				continue
			}
			if _, dup := own[c.Name]; dup {
				return nil, -1, &AnnotationError{Key: "container " + c.Name, Value: c.Name, Problem: "declared both as an init container and as a container"}
			}
			b, err := json.Marshal(c)
			if err != nil {
				return nil, -1, fmt.Errorf("encoding container %s: %w", c.Name, err)
			}
			own[c.Name] = c
			st.Overrides = append(st.Overrides, Override{Init: l.init, Index: i, Container: b})
			if !l.init && c.Name == ContainerProxy {
				gatewayAt = i
			}
		}
		*l.cs = slices.DeleteFunc(*l.cs, func(c corev1.Container) bool { return slices.Contains(injected, c.Name) })
	}
	return own, gatewayAt, nil
}

// mergeContainer returns base with over merged over it: Kubernetes'
// strategic merge (lists of env, ports, volume mounts merged by key, other
// lists replaced), over wins. over's image "auto" keeps base's image.
func mergeContainer(base, over corev1.Container) (corev1.Container, error) {
	if over.Image == ImageAuto {
		over.Image = ""
	}
	b, err := json.Marshal(base)
	if err != nil {
		return base, err
	}
	o, err := json.Marshal(over)
	if err != nil {
		return base, err
	}
	m, err := strategicpatch.StrategicMergePatch(b, o, corev1.Container{})
	if err != nil {
		return base, fmt.Errorf("strategic merge: %w", err)
	}
	var out corev1.Container
	if err := json.Unmarshal(m, &out); err != nil {
		return base, fmt.Errorf("decoding the merged container: %w", err)
	}
	return out, nil
}

// interceptionMode is the mode the proxy is told (ISTIO_META_INTERCEPTION_MODE).
func (p *params) interceptionMode() string {
	if p.captureOn {
		return p.capture.mode
	}
	return ModeNone
}

// proxyArgs are the arguments of `meshlet agent` in istio-proxy.
func proxyArgs(p params) []string {
	args := []string{"agent", "--drain-duration=" + p.drain.String()}
	if !p.captureOn {
		// Nothing is redirected to 15001/15006: do not serve them.
		args = append(args, "--capture-listeners=false")
	}
	return args
}

// grpcBootstrapContainer writes the proxyless gRPC bootstrap file.
func grpcBootstrapContainer(cfg *Config, p params, uid, gid int64) corev1.Container {
	return corev1.Container{
		Name:            ContainerGRPCBootstrap,
		Image:           p.image,
		ImagePullPolicy: cfg.ImagePullPolicy,
		Command:         []string{Binary},
		Args:            []string{"grpc-bootstrap", "--discovery-address=" + p.discovery, "--out=" + GRPCBootstrapFile},
		Env: []corev1.EnvVar{
			fieldEnv("POD_NAME", "metadata.name"),
			fieldEnv("POD_NAMESPACE", "metadata.namespace"),
			fieldEnv("INSTANCE_IP", "status.podIP"),
		},
		Resources:       *p.resources.DeepCopy(),
		VolumeMounts:    []corev1.VolumeMount{{Name: VolumeGRPC, MountPath: GRPCDir}},
		SecurityContext: unprivileged(uid, gid),
	}
}

// addGRPCToApps points every app container at the bootstrap file, unless
// it sets GRPC_XDS_BOOTSTRAP or mounts the directory itself, and records
// what it added in st.
func addGRPCToApps(pod *corev1.Pod, appNames []string, st *Status) {
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		if !slices.Contains(appNames, c.Name) {
			continue
		}
		if !slices.ContainsFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == EnvGRPCBootstrap }) {
			c.Env = append(c.Env, corev1.EnvVar{Name: EnvGRPCBootstrap, Value: GRPCBootstrapFile})
			if st.AppEnv == nil {
				st.AppEnv = map[string][]string{}
			}
			st.AppEnv[c.Name] = append(st.AppEnv[c.Name], EnvGRPCBootstrap)
		}
		if !slices.ContainsFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return m.Name == VolumeGRPC || m.MountPath == GRPCDir }) {
			c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: VolumeGRPC, MountPath: GRPCDir, ReadOnly: true})
			if st.AppVolumeMounts == nil {
				st.AppVolumeMounts = map[string][]string{}
			}
			st.AppVolumeMounts[c.Name] = append(st.AppVolumeMounts[c.Name], VolumeGRPC)
		}
	}
}

// restoreApps removes what addGRPCToApps added.
func restoreApps(pod *corev1.Pod, st *Status) {
	for i := range pod.Spec.Containers {
		c := &pod.Spec.Containers[i]
		if env := st.AppEnv[c.Name]; len(env) > 0 {
			c.Env = slices.DeleteFunc(c.Env, func(e corev1.EnvVar) bool { return slices.Contains(env, e.Name) })
			if len(c.Env) == 0 {
				c.Env = nil
			}
		}
		if vm := st.AppVolumeMounts[c.Name]; len(vm) > 0 {
			c.VolumeMounts = slices.DeleteFunc(c.VolumeMounts, func(m corev1.VolumeMount) bool { return slices.Contains(vm, m.Name) })
			if len(c.VolumeMounts) == 0 {
				c.VolumeMounts = nil
			}
		}
	}
}

// restoreOverrides puts the pod's own containers back where they were.
func restoreOverrides(pod *corev1.Pod, st *Status) error {
	for _, o := range st.Overrides {
		var c corev1.Container
		if err := json.Unmarshal(o.Container, &c); err != nil {
			return &AnnotationError{Key: AnnotationStatus, Value: string(o.Container), Problem: "override is not a container: " + err.Error()}
		}
		l := &pod.Spec.Containers
		if o.Init {
			l = &pod.Spec.InitContainers
		}
		*l = slices.Insert(*l, min(max(o.Index, 0), len(*l)), c)
	}
	return nil
}
