package inject

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// FuzzInject feeds arbitrary annotation values, names and flags to the core:
// it must never panic, never modify its input, and whenever it injects,
// re-injection is a no-op and Uninject restores the pod exactly. The seeds
// run as a normal test; `go test -fuzz FuzzInject ./webhook/inject/` explores.
func FuzzInject(f *testing.F) {
	f.Add("*", "22", "10.0.0.0/8", "", "443", "100m", "128Mi", "REDIRECT", "true", "holdApplicationUntilProxyStarts: true", "true", false, false, "app", "worker")
	f.Add("", "", "", "", "", "", "", "", "", "", "", false, true, "a", "")
	f.Add("80,99999", "x", "10.0.0.0/33", "nope", "0", "fast", "-1Mi", "NAT", "maybe", "{", "maybe", false, false, "app", "app")
	f.Add("8080", "8081", "fd00::/8", "::1/128", "1,2", "3", "4Gi", "tproxy", "off", `{"terminationDrainDuration":"1m","concurrency":2}`, "false", false, true, "istio-proxy", "x")
	f.Add("*", "", "*", "", "", "", "", "REDIRECT", "false", "terminationDrainDuration: 5", "yes", true, false, "", "b")
	f.Fuzz(func(t *testing.T, inb, exInb, inIPs, exIPs, outPorts, cpu, mem, mode, native, proxyCfg, label string, hostNet, cni bool, c1, c2 string) {
		cfg := DefaultConfig()
		cfg.CNI.Enabled = cni
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{
				Name:      "fuzz",
				Namespace: "fuzz",
				Labels:    map[string]string{},
				Annotations: map[string]string{
					AnnotationIncludeInboundPorts:     inb,
					AnnotationExcludeInboundPorts:     exInb,
					AnnotationIncludeOutboundIPRanges: inIPs,
					AnnotationExcludeOutboundIPRanges: exIPs,
					AnnotationExcludeOutboundPorts:    outPorts,
					AnnotationProxyCPU:                cpu,
					AnnotationProxyMemory:             mem,
					AnnotationInterceptionMode:        mode,
					AnnotationNativeSidecar:           native,
					AnnotationProxyConfig:             proxyCfg,
				},
			},
			Spec: corev1.PodSpec{HostNetwork: hostNet, Containers: []corev1.Container{{Name: c1, Image: "a"}}},
		}
		if label != "" {
			pod.Labels[LabelInject] = label
		}
		if c2 != "" {
			pod.Spec.InitContainers = []corev1.Container{{Name: c2, Image: "b"}}
		}
		orig := pod.DeepCopy()
		out, d, err := Inject(pod, Namespace{Name: "fuzz"}, &cfg, Options{AutoNativeSidecar: len(c1)%2 == 0})
		if !apiequality.Semantic.DeepEqual(pod, orig) {
			t.Fatal("Inject modified its input")
		}
		if out == nil {
			t.Fatal("nil pod")
		}
		if err != nil || !d.Injected {
			if !apiequality.Semantic.DeepEqual(out, orig) {
				t.Fatalf("a pod not injected (%s) came back changed", d.Reason)
			}
			return
		}
		again, d2, err := Inject(out, Namespace{Name: "fuzz"}, &cfg, Options{})
		if err != nil || d2.Injected || !apiequality.Semantic.DeepEqual(again, out) {
			t.Fatalf("re-injection not idempotent: %v %+v", err, d2)
		}
		back, err := Uninject(out)
		if err != nil {
			t.Fatal(err)
		}
		if !apiequality.Semantic.DeepEqual(back, orig) {
			t.Fatalf("uninject not exact:\n got %+v\nwant %+v", back, orig)
		}
	})
}
