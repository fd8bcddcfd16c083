package cni

import (
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	"github.com/spf13/pflag"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/cmd/meshlet/app/initcmd"
	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/initcni/capture/capturetest"
	"github.com/meshlet/meshlet/webhook/inject"
)

// TestInjectorAnnotationsMatchValidationFlags: in CNI mode the injector
// writes the effective capture annotations on the pod and gives the
// istio-validation container the same values as flags. For each annotation
// set, both come from the real injector: the plugin's reading of the pod's
// annotations and `meshlet init`'s flag parsing of the container's
// arguments must build the very same rules.
func TestInjectorAnnotationsMatchValidationFlags(t *testing.T) {
	t.Parallel()
	cfg := inject.DefaultConfig()
	cfg.CNI.Enabled = true
	sets := append([]map[string]string{nil, {capture.AnnotationExcludeOutboundPorts: "3306"}}, capturetest.Seeds...)
	compared := 0
	for _, ann := range sets {
		pod := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "app", Namespace: "default", Annotations: ann},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app:1"}}},
		}
		out, _, err := inject.Inject(pod, inject.Namespace{Name: "default"}, &cfg, inject.Options{AutoNativeSidecar: true})
		if err != nil {
			continue // refused at admission: the plugin never sees it
		}
		fromAnn, captured, why, err := CaptureFor(CaptureDefaults{}.Options(), out.Annotations)
		if err != nil {
			t.Errorf("annotations %q: the plugin refuses the injected pod: %v", ann, err)
			continue
		}
		var validation *corev1.Container
		for i, c := range out.Spec.InitContainers {
			if c.Name == inject.ContainerValidation {
				validation = &out.Spec.InitContainers[i]
			}
		}
		if !captured {
			if validation != nil {
				t.Errorf("annotations %q: the plugin does not capture (%s), but istio-validation was added", ann, why)
			}
			continue
		}
		if validation == nil || len(validation.Args) < 2 || validation.Args[0] != "init" || validation.Args[1] != "--validate" {
			t.Errorf("annotations %q: no istio-validation running init --validate: %+v", ann, validation)
			continue
		}
		o := capture.NewOptions()
		fs := pflag.NewFlagSet("init", pflag.ContinueOnError)
		initcmd.AddCaptureFlags(fs, &o)
		if err := fs.Parse(validation.Args[2:]); err != nil {
			t.Errorf("annotations %q: meshlet init's flags refuse %q: %v", ann, validation.Args, err)
			continue
		}
		fromFlags, err := capture.BuildConfig(o)
		if err != nil {
			t.Errorf("annotations %q: meshlet init refuses %q: %v", ann, validation.Args, err)
			continue
		}
		for _, f := range []capture.Family{capture.IPv4, capture.IPv6} {
			if d := capture.Diff(capture.Rules(fromFlags, f).Lines(), capture.Rules(fromAnn, f).Lines()); d != "" {
				t.Errorf("annotations %q, %s: the pod's annotations and istio-validation's flags disagree:\n%s", ann, f, d)
			}
		}
		compared++
	}
	if compared < len(sets)/2 {
		t.Errorf("only %d of %d sets compared", compared, len(sets))
	}
}

// TestCaptureForProperty is the CNI plugin's side of the capture property:
// for seeded random annotation sets on an injected pod, the plugin refuses
// the pod exactly when one of the annotations is refused on its own, and
// then names each such annotation with its value; otherwise it captures
// (unless the interception mode is NONE) with rules that render for both
// families.
func TestCaptureForProperty(t *testing.T) {
	t.Parallel()
	defaults := CaptureDefaults{}.Options()
	status := map[string]string{capture.AnnotationStatus: `{"containers":["istio-proxy"]}`}
	with := func(ann map[string]string) map[string]string {
		m := map[string]string{}
		for k, v := range status {
			m[k] = v
		}
		for k, v := range ann {
			m[k] = v
		}
		return m
	}
	refusedAlone := map[[2]string]bool{}
	alone := func(k, v string) bool {
		key := [2]string{k, v}
		if bad, ok := refusedAlone[key]; ok {
			return bad
		}
		_, _, _, err := CaptureFor(defaults, with(map[string]string{k: v}))
		refusedAlone[key] = err != nil
		return err != nil
	}
	r := rand.New(rand.NewPCG(21, 12))
	sets := slices.Clone(capturetest.Seeds)
	for range 3000 {
		sets = append(sets, capturetest.Annotations(r))
	}
	accepted := 0
	for _, ann := range sets {
		c, captured, why, err := CaptureFor(defaults, with(ann))
		none := strings.EqualFold(strings.TrimSpace(ann[capture.AnnotationInterceptionMode]), string(capture.ModeNone))
		if none {
			if err != nil || captured {
				t.Errorf("annotations %q: interception mode NONE must leave the pod alone: %v, %v (%s)", ann, err, captured, why)
			}
			continue
		}
		if problems := capturetest.Verdict(ann, err, alone, func(k, v string) string {
			return fmt.Sprintf("annotation %s %q", k, v)
		}); len(problems) > 0 || err != nil {
			for _, p := range problems {
				t.Error(p)
			}
			continue
		}
		if !captured {
			t.Errorf("annotations %q: injected pod not captured: %s", ann, why)
			continue
		}
		for _, f := range []capture.Family{capture.IPv4, capture.IPv6} {
			if out := capture.Rules(c, f).Render(); !strings.Contains(out, "-A ISTIO_OUTPUT") || !strings.HasSuffix(out, "COMMIT\n") {
				t.Errorf("annotations %q: %s rules do not render:\n%s", ann, f, out)
			}
		}
		accepted++
		if t.Failed() {
			return
		}
	}
	if accepted < len(sets)/10 {
		t.Errorf("only %d of %d sets accepted: the generator is lopsided", accepted, len(sets))
	}
	t.Logf("%d of %d annotation sets captured", accepted, len(sets))
}
