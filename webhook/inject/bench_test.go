package inject

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// realisticPod is a typical admission request's pod: a Deployment's pod
// with an app container (ports, env, probes, resources, mounts), a log
// shipper, an init container, a few volumes and annotations.
func realisticPod() *corev1.Pod {
	probe := func(path string) *corev1.Probe {
		return &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: path, Port: intstr.FromString("http")}}, PeriodSeconds: 10}
	}
	res := corev1.ResourceRequirements{
		Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("250m"), corev1.ResourceMemory: resource.MustParse("256Mi")},
		Limits:   corev1.ResourceList{corev1.ResourceMemory: resource.MustParse("512Mi")},
	}
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			GenerateName: "reviews-v2-5b64c8d6f-",
			Namespace:    "bookinfo",
			Labels:       map[string]string{"app": "reviews", "version": "v2", "pod-template-hash": "5b64c8d6f"},
			Annotations: map[string]string{
				AnnotationExcludeInboundPorts: "9901",
				AnnotationProxyMemory:         "256Mi",
				"prometheus.io/scrape":        "true",
			},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: "reviews-v2-5b64c8d6f", UID: "0b1c2d3e"}},
		},
		Spec: corev1.PodSpec{
			ServiceAccountName: "bookinfo-reviews",
			InitContainers:     []corev1.Container{{Name: "migrate", Image: "migrate:1", Args: []string{"up"}}},
			Containers: []corev1.Container{
				{
					Name:  "reviews",
					Image: "docker.io/istio/examples-bookinfo-reviews-v2:1.20.2",
					Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 9080}, {Name: "admin", ContainerPort: 9901}},
					Env: []corev1.EnvVar{
						{Name: "LOG_DIR", Value: "/tmp/logs"},
						{Name: "JAVA_OPTS", Value: "-Xmx256m"},
						{Name: "POD_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
					},
					Resources:      res,
					ReadinessProbe: probe("/ready"),
					LivenessProbe:  probe("/live"),
					VolumeMounts:   []corev1.VolumeMount{{Name: "tmp", MountPath: "/tmp"}, {Name: "config", MountPath: "/etc/reviews"}},
				},
				{Name: "log-shipper", Image: "fluent-bit:3", Args: []string{"-c", "/fluent-bit/etc/fluent-bit.conf"}, Resources: res},
			},
			Volumes: []corev1.Volume{
				{Name: "tmp", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}},
				{Name: "config", VolumeSource: corev1.VolumeSource{ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "reviews"}}}},
			},
		},
	}
}

// BenchmarkInject measures the core alone on a realistic pod (goal: under
// 100 µs and 100 KB per pod).
func BenchmarkInject(b *testing.B) {
	cfg := DefaultConfig()
	pod := realisticPod()
	ns := Namespace{Name: "bookinfo", Labels: map[string]string{LabelNamespaceInjection: "enabled"}}
	opts := Options{RequireOptIn: true, AutoNativeSidecar: true}
	b.ReportAllocs()
	for b.Loop() {
		if _, d, err := Inject(pod, ns, &cfg, opts); err != nil || !d.Injected {
			b.Fatal(err, d)
		}
	}
}

// BenchmarkInjectSkip is the cheap path: a pod in a namespace without
// injection.
func BenchmarkInjectSkip(b *testing.B) {
	cfg := DefaultConfig()
	pod := realisticPod()
	b.ReportAllocs()
	for b.Loop() {
		if _, d, _ := Inject(pod, Namespace{Name: "bookinfo"}, &cfg, Options{RequireOptIn: true}); d.Injected {
			b.Fatal("injected")
		}
	}
}

// BenchmarkUninject removes the sidecar again.
func BenchmarkUninject(b *testing.B) {
	cfg := DefaultConfig()
	pod, _, err := Inject(realisticPod(), Namespace{Name: "bookinfo"}, &cfg, Options{AutoNativeSidecar: true})
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Uninject(pod); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDeepCopy is the baseline: the copy every mutation starts with.
func BenchmarkDeepCopy(b *testing.B) {
	pod := realisticPod()
	b.ReportAllocs()
	for b.Loop() {
		_ = pod.DeepCopy()
	}
}
