package server

import (
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/webhook/inject"
)

// podFromDeployment creates dep through the API server, then a pod from
// its template the way the ReplicaSet controller would (envtest runs no
// controller-manager).
func (c *cluster) podFromDeployment(t *testing.T, ns string, dep *appsv1.Deployment) *corev1.Pod {
	t.Helper()
	dep, err := c.kube.AppsV1().Deployments(ns).Create(t.Context(), dep, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{ObjectMeta: *dep.Spec.Template.ObjectMeta.DeepCopy(), Spec: *dep.Spec.Template.Spec.DeepCopy()}
	pod.GenerateName = dep.Name + "-7c9d-"
	pod.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "Deployment", Name: dep.Name, UID: dep.UID}}
	got, err := c.create(t, ns, pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	return got
}

func deployment(name string, annotations map[string]string, containers ...corev1.Container) *appsv1.Deployment {
	return &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: appsv1.DeploymentSpec{
			Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": name}},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": name}, Annotations: annotations},
				Spec:       corev1.PodSpec{Containers: containers},
			},
		},
	}
}

func findContainer(cs []corev1.Container, name string) (int, *corev1.Container) {
	for i := range cs {
		if cs[i].Name == name {
			return i, &cs[i]
		}
	}
	return -1, nil
}

// TestEnvtestTemplatesAndOverrides creates, through a real API server, a
// gateway-template Deployment (Istio's gateway chart: the pod's own
// istio-proxy with image: auto and the gateway's ports) and a Deployment
// whose own istio-proxy overrides resources and runAsUser, and checks the
// pods the webhook gives back; uninjecting them gives back what the
// Deployment declared.
func TestEnvtestTemplatesAndOverrides(t *testing.T) {
	c := startCluster(t, clusterOptions{})

	t.Run("gateway template", func(t *testing.T) {
		dep := deployment("ingress", map[string]string{inject.AnnotationTemplates: "gateway"}, corev1.Container{
			Name: inject.ContainerProxy, Image: inject.ImageAuto,
			Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}, {Name: "https", ContainerPort: 8443}},
		})
		pod := c.podFromDeployment(t, "apps", dep)
		if len(pod.Spec.InitContainers) != 0 {
			t.Errorf("gateway pod has init containers %v (no capture wanted)", pod.Spec.InitContainers)
		}
		i, proxy := findContainer(pod.Spec.Containers, inject.ContainerProxy)
		if i != 0 || len(pod.Spec.Containers) != 1 {
			t.Fatalf("want the merged istio-proxy as the only container, got %+v", pod.Spec.Containers)
		}
		if proxy.Image != "meshlet/meshlet:envtest-1" {
			t.Errorf("image %q: image auto must become the injected image", proxy.Image)
		}
		if proxy.RestartPolicy != nil {
			t.Error("a gateway's istio-proxy is not a native sidecar")
		}
		if !slices.Contains(proxy.Args, "--capture-listeners=false") {
			t.Errorf("gateway proxy args %q lack --capture-listeners=false", proxy.Args)
		}
		var ports []int32
		for _, p := range proxy.Ports {
			ports = append(ports, p.ContainerPort)
		}
		for _, want := range []int32{8080, 8443, inject.PrometheusPort} {
			if !slices.Contains(ports, want) {
				t.Errorf("ports %v lack %d", ports, want)
			}
		}
		back, err := inject.Uninject(pod)
		if err != nil {
			t.Fatal(err)
		}
		if _, c := findContainer(back.Spec.Containers, inject.ContainerProxy); c == nil || c.Image != inject.ImageAuto || len(c.Ports) != 2 || len(back.Spec.Volumes) != 0 {
			t.Errorf("uninject does not give back the declared istio-proxy: %+v", back.Spec)
		}
	})

	t.Run("overriding istio-proxy", func(t *testing.T) {
		uid := int64(1000650000)
		dep := deployment("tuned", nil,
			corev1.Container{Name: "app", Image: "nginx:1.27"},
			corev1.Container{
				Name: inject.ContainerProxy, Image: inject.ImageAuto,
				Resources:       corev1.ResourceRequirements{Requests: corev1.ResourceList{corev1.ResourceCPU: resource.MustParse("50m")}},
				SecurityContext: &corev1.SecurityContext{RunAsUser: &uid},
			})
		pod := c.podFromDeployment(t, "apps", dep)
		if _, p := findContainer(pod.Spec.Containers, inject.ContainerProxy); p != nil {
			t.Fatal("the declared istio-proxy is still among the containers (want it merged into the native sidecar)")
		}
		_, proxy := findContainer(pod.Spec.InitContainers, inject.ContainerProxy)
		if proxy == nil || proxy.RestartPolicy == nil {
			t.Fatalf("no native istio-proxy sidecar: %+v", pod.Spec.InitContainers)
		}
		if got := proxy.Resources.Requests[corev1.ResourceCPU]; got.String() != "50m" {
			t.Errorf("cpu request %s, want the pod's 50m", got.String())
		}
		if got := proxy.Resources.Limits[corev1.ResourceMemory]; got.String() != "1Gi" {
			t.Errorf("memory limit %s, want the injected 1Gi kept", got.String())
		}
		if proxy.SecurityContext == nil || proxy.SecurityContext.RunAsUser == nil || *proxy.SecurityContext.RunAsUser != uid ||
			proxy.SecurityContext.RunAsNonRoot == nil || !*proxy.SecurityContext.RunAsNonRoot {
			t.Errorf("securityContext %+v: want runAsUser %d merged over the injected one", proxy.SecurityContext, uid)
		}
		_, initC := findContainer(pod.Spec.InitContainers, inject.ContainerInit)
		if initC == nil || !strings.Contains(strings.Join(initC.Args, " "), "-u 1000650000") {
			t.Errorf("istio-init must exempt the overridden UID: %+v", initC)
		}
		back, err := inject.Uninject(pod)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, c := range back.Spec.Containers {
			names = append(names, c.Name)
		}
		if !slices.Equal(names, []string{"app", inject.ContainerProxy}) || len(back.Spec.InitContainers) != 0 {
			t.Fatalf("uninject: containers %v, init containers %v; want the Deployment's", names, back.Spec.InitContainers)
		}
		if got := back.Spec.Containers[1]; got.Image != inject.ImageAuto || got.Resources.Limits != nil || *got.SecurityContext.RunAsUser != uid || got.SecurityContext.RunAsNonRoot != nil {
			t.Errorf("uninject does not give back the declared istio-proxy: %+v", got)
		}
	})
}
