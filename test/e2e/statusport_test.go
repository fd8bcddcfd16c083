package e2e

import (
	"context"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/test/cluster"
)

// curlIn runs curl in the network namespace netns (a pod's) and returns the
// HTTP status code and the body.
func curlIn(t *testing.T, ctx context.Context, netns, method, url string) (int, string) {
	t.Helper()
	out, err := exec.CommandContext(ctx, "ip", "netns", "exec", netns,
		"curl", "-sS", "--max-time", "10", "-X", method, "-w", "\n%{http_code}", url).CombinedOutput()
	if err != nil {
		t.Fatalf("curl -X %s %s in netns %s: %v\n%s", method, url, netns, err, out)
	}
	s := strings.TrimRight(string(out), "\n")
	i := strings.LastIndex(s, "\n")
	var code int
	if _, err := fmt.Sscan(s[i+1:], &code); err != nil {
		t.Fatalf("curl -X %s %s: no status code in %q", method, url, out)
	}
	return code, s[:max(i, 0)]
}

// proxyRestarts returns the restart count of the pod's istio-proxy
// (a native sidecar, among the init containers, or a classic container).
func proxyRestarts(ctx context.Context, ns, name string) (int32, error) {
	pod, err := cs.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return 0, err
	}
	for _, st := range append(append([]corev1.ContainerStatus(nil), pod.Status.InitContainerStatuses...), pod.Status.ContainerStatuses...) {
		if st.Name == "istio-proxy" {
			return st.RestartCount, nil
		}
	}
	return 0, fmt.Errorf("pod %s/%s has no istio-proxy status", ns, name)
}

// TestSidecarStatusPortOnlyFromPod: a pod in another namespace reaches a
// meshed pod's 15020 (as every pod can) but gets 403 for POST /quitquitquit,
// /drain, /reload and for /server_info, and the sidecar keeps running and
// ready; the kubelet's probes and metrics still answer; from inside the pod
// (its network namespace, over loopback, as the app container calls it)
// /quitquitquit still stops the sidecar.
func TestSidecarStatusPortOnlyFromPod(t *testing.T) {
	ctx := need(t)
	needSubcommand(t, "webhook")
	needSubcommand(t, "agent")
	const meshed, other = "status-meshed", "status-other"
	installMeshlet(t, ctx, meshed, other)
	for _, ns := range []string{meshed, other} {
		kubectl(t, ctx, nil, "create", "namespace", ns)
		if ns == meshed {
			kubectl(t, ctx, nil, "label", "namespace", ns, "istio-injection=enabled")
		}
		kubectl(t, ctx, nil, "apply", "-n", ns, "-f", "test/e2e/testdata/app.yaml")
	}
	for _, ns := range []string{meshed, other} {
		if _, err := kc.Kubectl(ctx, nil, "wait", "-n", ns, "--for=condition=Available", "deployment/echo", "--timeout=180s"); err != nil {
			dumpDiagnostics(t, ctx, ns)
			t.Fatal(err)
		}
	}
	target := runningPod(t, ctx, meshed, "app=echo")
	assertInjected(t, target)
	attacker := runningPod(t, ctx, other, "app=echo")
	assertNotInjected(t, attacker)
	attackerNS, targetNS := podNetns(t, ctx, attacker), podNetns(t, ctx, target)
	before, err := proxyRestarts(ctx, meshed, target.Name)
	if err != nil {
		t.Fatal(err)
	}
	base := "http://" + target.Status.PodIP + ":15020"

	for _, c := range []struct{ method, path string }{
		{"POST", "/quitquitquit"}, {"POST", "/drain"}, {"POST", "/reload"}, {"GET", "/server_info"},
	} {
		code, body := curlIn(t, ctx, attackerNS, c.method, base+c.path)
		if code != 403 || !strings.Contains(body, "only served to callers inside the pod") {
			t.Errorf("%s %s from pod %s/%s: %d %q, want 403 saying why", c.method, c.path, other, attacker.Name, code, body)
		}
	}
	if code, body := curlIn(t, ctx, attackerNS, "GET", base+"/healthz/ready"); code != 200 {
		t.Errorf("GET /healthz/ready from another pod: %d %s", code, body)
	}
	code, metrics := curlIn(t, ctx, attackerNS, "GET", base+"/stats/prometheus")
	if code != 200 || !strings.Contains(metrics, `meshlet_agent_status_denied_total{path="/quitquitquit"} 1`) {
		t.Errorf("metrics from another pod: %d, want meshlet_agent_status_denied_total{path=\"/quitquitquit\"} 1 in:\n%.3000s", code, metrics)
	}

	// Nothing happened to the sidecar: same restart count, pod still Ready.
	time.Sleep(5 * time.Second)
	pod, err := cs.CoreV1().Pods(meshed).Get(ctx, target.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	ready := false
	for _, c := range pod.Status.Conditions {
		ready = ready || c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue
	}
	if after, err := proxyRestarts(ctx, meshed, target.Name); err != nil || after != before || !ready {
		t.Fatalf("after refused calls: istio-proxy restarts %d → %d (%v), pod ready %v", before, after, err, ready)
	}

	// The app's own path: loopback inside the pod's network namespace.
	if code, body := curlIn(t, ctx, targetNS, "POST", "http://127.0.0.1:15020/quitquitquit"); code != 200 {
		t.Fatalf("POST /quitquitquit over the pod's loopback: %d %s", code, body)
	}
	if err := cluster.WaitFor(ctx, 60*time.Second, "istio-proxy exits after /quitquitquit", func(ctx context.Context) error {
		n, err := proxyRestarts(ctx, meshed, target.Name)
		if err != nil {
			return err
		}
		if n == before {
			return fmt.Errorf("istio-proxy restart count still %d", n)
		}
		return nil
	}); err != nil {
		t.Error(err)
	}
}
