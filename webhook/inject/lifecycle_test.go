package inject

import (
	"slices"
	"testing"

	corev1 "k8s.io/api/core/v1"
)

// TestInjectAllowRemoteLifecycle: istio-proxy's agent gets
// --allow-remote-lifecycle only when the config opts in (off by default), and
// the opt-in loads from a config document.
func TestInjectAllowRemoteLifecycle(t *testing.T) {
	agentArgs := func(cfg Config) []string {
		t.Helper()
		out, _, err := Inject(testPod(), Namespace{Name: "shop"}, &cfg, Options{AutoNativeSidecar: true})
		if err != nil {
			t.Fatal(err)
		}
		for _, cs := range [][]corev1.Container{out.Spec.InitContainers, out.Spec.Containers} {
			for _, c := range cs {
				if c.Name == ContainerProxy {
					return c.Args
				}
			}
		}
		t.Fatal("no istio-proxy injected")
		return nil
	}
	def := DefaultConfig()
	if def.AllowRemoteLifecycle {
		t.Fatal("allowRemoteLifecycle is on by default")
	}
	if args := agentArgs(def); slices.Contains(args, "--allow-remote-lifecycle") {
		t.Errorf("default istio-proxy args %v open the lifecycle endpoints", args)
	}
	on, err := LoadConfig([]byte("apiVersion: meshlet.io/v1alpha1\nkind: InjectionConfig\nallowRemoteLifecycle: true\n"))
	if err != nil {
		t.Fatal(err)
	}
	if args := agentArgs(on); !slices.Contains(args, "--allow-remote-lifecycle") {
		t.Errorf("istio-proxy args %v lack --allow-remote-lifecycle with the opt-in", args)
	}
}
