package inject

import (
	"errors"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func testPod() *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "shop", Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{
			InitContainers: []corev1.Container{{Name: "migrate", Image: "migrate:1"}},
			Containers:     []corev1.Container{{Name: "web", Image: "nginx:1.27", Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}}}},
		},
	}
}

func TestInjectDefaultArgs(t *testing.T) {
	cfg := DefaultConfig()
	in := testPod()
	orig := in.DeepCopy()
	out, d, err := Inject(in, Namespace{Name: "shop"}, &cfg, Options{AutoNativeSidecar: true})
	if err != nil || !d.Injected || d.Reason != ReasonInjected {
		t.Fatalf("Inject: %v %+v", err, d)
	}
	if !apiequality.Semantic.DeepEqual(in, orig) {
		t.Fatal("Inject modified its input")
	}
	names := func(cs []corev1.Container) (n []string) {
		for _, c := range cs {
			n = append(n, c.Name)
		}
		return n
	}
	if got := names(out.Spec.InitContainers); !slices.Equal(got, []string{"istio-init", "istio-proxy", "migrate"}) {
		t.Fatalf("init containers %v", got)
	}
	wantArgs := []string{"init", "-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337", "-m", "REDIRECT",
		"-i", "*", "-x", "", "-b", "*", "-d", "22,15090,15021,15020", "-q", "", "-o", "", "-c", ""}
	if got := out.Spec.InitContainers[0].Args; !slices.Equal(got, wantArgs) {
		t.Fatalf("istio-init args\n got %q\nwant %q", got, wantArgs)
	}
	if got := out.Spec.InitContainers[1].Args; !slices.Equal(got, []string{"agent", "--drain-duration=5s"}) {
		t.Fatalf("istio-proxy args %q", got)
	}
	again, d2, err := Inject(out, Namespace{Name: "shop"}, &cfg, Options{AutoNativeSidecar: true})
	if err != nil || d2.Injected || d2.Reason != ReasonAlreadyInjected || !apiequality.Semantic.DeepEqual(again, out) {
		t.Fatalf("re-inject: %v %+v", err, d2)
	}
	back, err := Uninject(out)
	if err != nil {
		t.Fatal(err)
	}
	if !apiequality.Semantic.DeepEqual(back, orig) {
		t.Fatalf("uninject is not exact:\n%+v\n%+v", back, orig)
	}
}

func TestInjectDecisions(t *testing.T) {
	cfg := DefaultConfig()
	web := Options{RequireOptIn: true, AutoNativeSidecar: true}
	enabled := map[string]string{"istio-injection": "enabled"}
	tests := []struct {
		name      string
		mut       func(*corev1.Pod)
		ns        Namespace
		opts      Options
		want      Reason
		warnMatch string
	}{
		{"cli injects", nil, Namespace{Name: "shop"}, Options{}, ReasonInjected, ""},
		{"webhook enabled ns", nil, Namespace{Name: "shop", Labels: enabled}, web, ReasonInjected, ""},
		{"webhook plain ns", nil, Namespace{Name: "shop"}, web, ReasonNamespaceNotEnabled, ""},
		{"webhook plain ns opt-in label", func(p *corev1.Pod) { p.Labels[LabelInject] = "true" }, Namespace{Name: "shop"}, web, ReasonInjected, ""},
		{"webhook opt-in deprecated annotation", func(p *corev1.Pod) { p.Annotations = map[string]string{AnnotationInject: "true"} }, Namespace{Name: "shop"}, web, ReasonInjected, "deprecated"},
		{"webhook disabled ns", func(p *corev1.Pod) { p.Labels[LabelInject] = "true" }, Namespace{Name: "shop", Labels: map[string]string{"istio-injection": "disabled"}}, web, ReasonNamespaceDisabled, "asks for injection"},
		{"opt-out label", func(p *corev1.Pod) { p.Labels[LabelInject] = "false" }, Namespace{Name: "shop", Labels: enabled}, web, ReasonOptOut, ""},
		{"label wins over annotation", func(p *corev1.Pod) {
			p.Labels[LabelInject] = "false"
			p.Annotations = map[string]string{AnnotationInject: "true"}
		}, Namespace{Name: "shop"}, Options{}, ReasonOptOut, "label of the same name"},
		{"corrected label", func(p *corev1.Pod) { p.Labels[LabelInject] = "yes" }, Namespace{Name: "shop"}, web, ReasonInjected, "read as"},
		{"hostNetwork", func(p *corev1.Pod) { p.Spec.HostNetwork = true }, Namespace{Name: "shop"}, Options{}, ReasonHostNetwork, ""},
		{"kube-system", nil, Namespace{Name: "kube-system"}, Options{}, ReasonSystemNamespace, ""},
		{"kube-public", nil, Namespace{Name: "kube-public"}, Options{}, ReasonSystemNamespace, ""},
		{"webhook namespace", func(p *corev1.Pod) { p.Labels[LabelInject] = "true" }, Namespace{Name: "meshlet-system"}, Options{}, ReasonSystemNamespace, "asks for injection"},
		{"namespace from pod", func(p *corev1.Pod) { p.Namespace = "kube-system" }, Namespace{}, Options{}, ReasonSystemNamespace, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p := testPod()
			if tt.mut != nil {
				tt.mut(p)
			}
			_, d, err := Inject(p, tt.ns, &cfg, tt.opts)
			if err != nil {
				t.Fatal(err)
			}
			if d.Reason != tt.want || d.Injected != (tt.want == ReasonInjected) || d.Message == "" {
				t.Fatalf("decision %+v, want %s", d, tt.want)
			}
			if tt.warnMatch != "" && !strings.Contains(strings.Join(d.Warnings, "\n"), tt.warnMatch) {
				t.Fatalf("warnings %q lack %q", d.Warnings, tt.warnMatch)
			}
			if tt.warnMatch == "" && len(d.Warnings) > 0 {
				t.Fatalf("unexpected warnings %q", d.Warnings)
			}
		})
	}
}

func TestInjectInvalidAnnotationsAllReported(t *testing.T) {
	cfg := DefaultConfig()
	p := testPod()
	p.Annotations = map[string]string{
		AnnotationIncludeInboundPorts:     "80,70000",
		AnnotationExcludeInboundPorts:     "x",
		AnnotationIncludeOutboundIPRanges: "10.0.0.0/40",
		AnnotationExcludeOutboundIPRanges: "nope",
		AnnotationIncludeOutboundPorts:    "0",
		AnnotationExcludeOutboundPorts:    "1,2,a",
		AnnotationExcludeInterfaces:       "bad/if",
		AnnotationProxyCPU:                "fast",
		AnnotationProxyMemory:             "-1Mi",
		AnnotationProxyCPULimit:           "1x",
		AnnotationProxyMemoryLimit:        "lots",
		AnnotationProxyImage:              "a b",
		AnnotationInterceptionMode:        "NAT",
		AnnotationNativeSidecar:           "sometimes",
		AnnotationTemplates:               "sidecar,nope",
		AnnotationProxyConfig:             "holdApplicationUntilProxyStarts: perhaps\nterminationDrainDuration: forever\n",
	}
	out, d, err := Inject(p, Namespace{Name: "shop"}, &cfg, Options{})
	if err == nil || d.Injected || d.Reason != ReasonInvalidAnnotations {
		t.Fatalf("want error, got %v %+v", err, d)
	}
	if !apiequality.Semantic.DeepEqual(out, p) {
		t.Fatal("a rejected pod must come back unchanged")
	}
	for k, v := range p.Annotations {
		want := (&AnnotationError{Key: k, Value: v}).Error()
		want = want[:strings.LastIndex(want, ":")]
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error does not name %s:\n%v", want, err)
		}
	}
	var ae *AnnotationError
	if !errors.As(err, &ae) {
		t.Fatalf("not an *AnnotationError: %T", err)
	}
	for _, w := range []string{"perhaps", "forever"} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %q", w)
		}
	}
}

func TestInjectConflictsAndBadConfig(t *testing.T) {
	cfg := DefaultConfig()
	p := testPod()
	p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: ContainerProxy, Image: "x"})
	p.Spec.InitContainers = append(p.Spec.InitContainers, corev1.Container{Name: ContainerProxy, Image: "y"})
	out, d, err := Inject(p, Namespace{Name: "shop"}, &cfg, Options{})
	if err == nil || d.Injected || !strings.Contains(err.Error(), "container "+ContainerProxy) || !strings.Contains(err.Error(), "declared both") || !apiequality.Semantic.DeepEqual(out, p) {
		t.Fatalf("a pod declaring istio-proxy twice: %v %+v", err, d)
	}
	p = testPod()
	p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: VolumeRuntime})
	if _, _, err := Inject(p, Namespace{Name: "shop"}, &cfg, Options{}); err == nil || !strings.Contains(err.Error(), "volume "+VolumeRuntime) {
		t.Fatalf("a pod with its own %s volume: %v", VolumeRuntime, err)
	}

	bad := DefaultConfig()
	bad.Capture.ExcludeInboundPorts = "ssh"
	bad.Resources.Limits.CPU = "lots"
	bad.TerminationDrainDuration = "0s"
	_, d, err = Inject(testPod(), Namespace{Name: "shop"}, &bad, Options{})
	if err == nil || d.Injected {
		t.Fatalf("an unvalidated bad config must fail, got %+v", d)
	}
	for _, w := range []string{`capture.excludeInboundPorts="ssh"`, `resources.limits.cpu="lots"`, `terminationDrainDuration="0s"`} {
		if !strings.Contains(err.Error(), w) {
			t.Errorf("error lacks %q: %v", w, err)
		}
	}
	if _, _, err := Inject(nil, Namespace{}, &cfg, Options{}); err == nil {
		t.Error("nil pod accepted")
	}
	if _, _, err := Inject(testPod(), Namespace{}, nil, Options{}); err == nil {
		t.Error("nil config accepted")
	}
	if _, err := Uninject(&corev1.Pod{ObjectMeta: metav1.ObjectMeta{Annotations: map[string]string{AnnotationStatus: "{"}}}); err == nil || !strings.Contains(err.Error(), AnnotationStatus) {
		t.Errorf("bad status annotation: %v", err)
	}
}

func TestCaptureArgsFromAnnotations(t *testing.T) {
	cfg := DefaultConfig()
	p := testPod()
	p.Annotations = map[string]string{
		AnnotationIncludeInboundPorts:     "8080, 9090",
		AnnotationExcludeInboundPorts:     "8081,22,15020",
		AnnotationIncludeOutboundIPRanges: "10.0.0.0/8,fd00::/8",
		AnnotationExcludeOutboundIPRanges: "10.96.0.1/32",
		AnnotationIncludeOutboundPorts:    "443",
		AnnotationExcludeOutboundPorts:    "3306,5432",
		AnnotationExcludeInterfaces:       "eth1,net1",
		AnnotationInterceptionMode:        "redirect",
		AnnotationNativeSidecar:           "false",
	}
	out, _, err := Inject(p, Namespace{Name: "shop"}, &cfg, Options{AutoNativeSidecar: true})
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"init", "-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337", "-m", "REDIRECT",
		"-i", "10.0.0.0/8,fd00::/8", "-x", "10.96.0.1/32", "-b", "8080,9090", "-d", "22,15090,15021,15020,8081",
		"-q", "443", "-o", "3306,5432", "-c", "eth1,net1"}
	initC := out.Spec.InitContainers[len(out.Spec.InitContainers)-1]
	if initC.Name != ContainerInit || !slices.Equal(initC.Args, want) {
		t.Fatalf("istio-init %s args\n got %q\nwant %q", initC.Name, initC.Args, want)
	}
	if proxy := out.Spec.Containers[len(out.Spec.Containers)-1]; proxy.Name != ContainerProxy || *proxy.SecurityContext.RunAsUser != 1337 || *proxy.SecurityContext.RunAsGroup != 1337 {
		t.Fatalf("the proxy must run as UID/GID 1337: %+v", proxy.SecurityContext)
	}
}

// TPROXY is Istio vocabulary meshlet does not implement yet: the pod is
// refused at admission with the annotation and value named, instead of being
// admitted to fail in istio-init; a config asking for it is refused too.
func TestTProxyRejected(t *testing.T) {
	cfg := DefaultConfig()
	p := testPod()
	p.Annotations = map[string]string{AnnotationInterceptionMode: "tproxy"}
	_, _, err := Inject(p, Namespace{Name: "shop"}, &cfg, Options{})
	if err == nil || !strings.Contains(err.Error(), AnnotationInterceptionMode+`="tproxy"`) || !strings.Contains(err.Error(), "use REDIRECT") {
		t.Fatalf("Inject with interceptionMode tproxy = %v, want a rejection naming the annotation, value and REDIRECT", err)
	}
	cfg.Capture.InterceptionMode = ModeTProxy
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "capture.interceptionMode") || !strings.Contains(err.Error(), "TPROXY is not supported") {
		t.Fatalf("Validate with capture.interceptionMode TPROXY = %v, want a rejection naming the field", err)
	}
}
