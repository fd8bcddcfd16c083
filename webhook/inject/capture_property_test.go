package inject_test

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/cmd/meshlet/app/initcmd"
	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/initcni/capture/capturetest"
	"github.com/meshlet/meshlet/initcni/cni"
	"github.com/meshlet/meshlet/webhook/inject"
)

// runInit runs the real `meshlet init` command with args, in process.
func runInit(args []string) (string, error) {
	var out, errb bytes.Buffer
	if err := initcmd.Run(context.Background(), args, cli.Streams{In: strings.NewReader(""), Out: &out, Err: &errb}); err != nil {
		return out.String(), fmt.Errorf("%w (stderr: %s)", err, errb.String())
	}
	return out.String(), nil
}

// captureChecker checks annotation sets against one injection config,
// remembering which single annotation is refused on its own.
type captureChecker struct {
	cfg     inject.Config
	badOnly map[[2]string]bool
}

func newCaptureChecker(cni bool) *captureChecker {
	c := &captureChecker{cfg: inject.DefaultConfig(), badOnly: map[[2]string]bool{}}
	c.cfg.CNI.Enabled = cni
	return c
}

func capturePod(ann map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "prop", Namespace: "prop", Annotations: ann},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app:1"}}},
	}
}

// refusedAlone reports whether the pod with only the annotation k=v is
// refused.
func (c *captureChecker) refusedAlone(k, v string) bool {
	key := [2]string{k, v}
	if bad, ok := c.badOnly[key]; ok {
		return bad
	}
	_, _, err := inject.Inject(capturePod(map[string]string{k: v}), inject.Namespace{Name: "prop"}, &c.cfg, inject.Options{})
	c.badOnly[key] = err != nil
	return err != nil
}

// check is the property: a pod with these annotations is refused exactly
// when one of them is refused on its own, and the message names each of
// those (annotation and value) and no other; an admitted pod's istio-init
// (istio-validation) arguments are accepted by the real `meshlet init` and
// render rules, and in CNI mode the CNI plugin derives the very same rules
// from the annotations the injector wrote.
func (c *captureChecker) check(t testing.TB, ann map[string]string) {
	t.Helper()
	out, d, err := inject.Inject(capturePod(ann), inject.Namespace{Name: "prop"}, &c.cfg, inject.Options{AutoNativeSidecar: true})
	if problems := capturetest.Verdict(ann, err, c.refusedAlone, func(k, v string) string {
		return fmt.Sprintf("annotation %s=%q", k, v)
	}); len(problems) > 0 || err != nil {
		for _, p := range problems {
			t.Error(p)
		}
		return
	}
	if !d.Injected {
		t.Errorf("annotations %q: not injected: %+v", ann, d)
		return
	}
	var initC *corev1.Container
	for i, ic := range out.Spec.InitContainers {
		if ic.Name == inject.ContainerInit || ic.Name == inject.ContainerValidation {
			initC = &out.Spec.InitContainers[i]
		}
	}
	none := strings.EqualFold(strings.TrimSpace(ann[inject.AnnotationInterceptionMode]), string(capture.ModeNone))
	cniCfg, captured, why, cerr := cni.CaptureFor(cni.CaptureDefaults{}.Options(), out.Annotations)
	if none {
		if initC != nil {
			t.Errorf("annotations %q: interception mode NONE, but %s was added", ann, initC.Name)
		}
		if c.cfg.CNI.Enabled && (captured || cerr != nil) {
			t.Errorf("annotations %q: interception mode NONE, but the CNI plugin captures (%v, %v)", ann, why, cerr)
		}
		return
	}
	if initC == nil {
		t.Errorf("annotations %q: injected without %s or %s", ann, inject.ContainerInit, inject.ContainerValidation)
		return
	}
	args := initC.Args
	if len(args) == 0 || args[0] != "init" {
		t.Errorf("annotations %q: %s args %q do not start with init", ann, initC.Name, args)
		return
	}
	args = slices.DeleteFunc(slices.Clone(args[1:]), func(a string) bool { return a == "--validate" })
	rendered, err := runInit(append([]string{"--dry-run"}, args...))
	if err != nil {
		t.Errorf("annotations %q admitted, but meshlet init refuses %s's args %q: %v", ann, initC.Name, initC.Args, err)
		return
	}
	if !strings.Contains(rendered, "-A ISTIO_OUTPUT") {
		t.Errorf("annotations %q: meshlet init --dry-run %q rendered no rules:\n%s", ann, args, rendered)
	}
	if !c.cfg.CNI.Enabled {
		return
	}
	if cerr != nil || !captured {
		t.Errorf("annotations %q admitted in CNI mode, but the CNI plugin refuses the pod (%v, %s); pod annotations %q", ann, cerr, why, out.Annotations)
		return
	}
	if want := "# iptables-restore --noflush\n" + capture.Rules(cniCfg, capture.IPv4).Render(); rendered != want {
		t.Errorf("annotations %q: the CNI plugin's rules differ from istio-validation's flags %q:\n%s", ann, args, capture.Diff(strings.Split(rendered, "\n"), strings.Split(want, "\n")))
	}
}

// TestCaptureAnnotationsProperty runs the seeds (the cases that used to be
// admitted and then refused by meshlet init) and 3000 seeded random
// annotation sets through the injector, in istio-init and in CNI mode.
func TestCaptureAnnotationsProperty(t *testing.T) {
	t.Parallel()
	r := rand.New(rand.NewPCG(12, 21))
	sets := slices.Clone(capturetest.Seeds)
	for range 3000 {
		sets = append(sets, capturetest.Annotations(r))
	}
	for _, cniMode := range []bool{false, true} {
		t.Run(fmt.Sprintf("cni=%v", cniMode), func(t *testing.T) {
			t.Parallel()
			c := newCaptureChecker(cniMode)
			admitted := 0
			for _, ann := range sets {
				c.check(t, ann)
				if _, _, err := inject.Inject(capturePod(ann), inject.Namespace{Name: "prop"}, &c.cfg, inject.Options{}); err == nil {
					admitted++
				}
				if t.Failed() {
					return
				}
			}
			// The generator must exercise both outcomes.
			if admitted < len(sets)/10 || admitted > len(sets)*9/10 {
				t.Errorf("%d of %d sets admitted: the generator is lopsided", admitted, len(sets))
			}
			t.Logf("%d of %d annotation sets admitted", admitted, len(sets))
		})
	}
}

// FuzzCaptureAnnotations is the same property over fuzzed values: present
// selects which of the eight capture annotations the pod carries.
func FuzzCaptureAnnotations(f *testing.F) {
	f.Add(uint8(0x01), "REDIRECT", "15021", "", "", "", "", "", "")
	f.Add(uint8(0x80), "", "", "", "", "", "", "", "lo")
	f.Add(uint8(0xff), "none", "*", "22", "10.0.0.0/8", "10.0.0.0/8", "443", "443", "eth1")
	f.Add(uint8(0x7e), "redirect", "80,15008", "80", "fd00::/8", "::ffff:10.0.0.0/64", "0", "x", "a/b")
	var checkers = map[bool]*captureChecker{false: newCaptureChecker(false), true: newCaptureChecker(true)}
	keys := []string{inject.AnnotationInterceptionMode, inject.AnnotationIncludeInboundPorts, inject.AnnotationExcludeInboundPorts,
		inject.AnnotationIncludeOutboundIPRanges, inject.AnnotationExcludeOutboundIPRanges, inject.AnnotationIncludeOutboundPorts,
		inject.AnnotationExcludeOutboundPorts, inject.AnnotationExcludeInterfaces}
	f.Fuzz(func(t *testing.T, present uint8, mode, inb, exInb, inIPs, exIPs, inPorts, exPorts, ifaces string) {
		vals := []string{mode, inb, exInb, inIPs, exIPs, inPorts, exPorts, ifaces}
		ann := map[string]string{}
		for i, k := range keys {
			if present&(1<<i) != 0 {
				ann[k] = vals[i]
			}
		}
		for _, cniMode := range []bool{false, true} {
			checkers[cniMode].check(t, ann)
		}
	})
}
