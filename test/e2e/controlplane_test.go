package e2e

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/test/cluster"
)

// scaleDiscovery sets the control plane's replicas and waits until that
// many discovery pods exist and are ready (none at all for 0).
func scaleDiscovery(t *testing.T, ctx context.Context, replicas int) {
	t.Helper()
	kubectl(t, ctx, nil, "scale", "-n", webhookNamespace, "deployment/"+discoveryDeployment, fmt.Sprintf("--replicas=%d", replicas))
	if err := cluster.WaitFor(ctx, 120*time.Second, fmt.Sprintf("%d discovery pods ready behind %s", replicas, discoveryService), func(ctx context.Context) error {
		pods, err := cs.CoreV1().Pods(webhookNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app.kubernetes.io/component=discovery"})
		if err != nil {
			return err
		}
		if len(pods.Items) != replicas {
			return fmt.Errorf("%d discovery pods", len(pods.Items))
		}
		h, err := sampleDeployment(ctx, discoveryDeployment, discoveryService)
		if err != nil {
			return err
		}
		if replicas > 0 && !h.ok() {
			return fmt.Errorf("%v", h)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
}

// healthz returns the answer of the sidecar's /healthz/ready on 15021
// (reached from the node; 15021 is never captured).
func healthz(ctx context.Context, pod *corev1.Pod) (int, string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+pod.Status.PodIP+":15021/healthz/ready", nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(b)), nil
}

// TestControlPlaneOutage: a sidecar never serves without a configuration,
// and a control-plane outage never takes traffic down. With the chart's
// discovery scaled to zero a new pod's istio-proxy runs but reports not
// ready (503 on 15021, saying why) and, as a native sidecar, holds the
// app container back; once discovery is back the pods start and traffic
// flows through both sidecars. Then, with discovery down again, the
// server's istio-proxy is stopped (POST /quitquitquit from inside the pod)
// and restarted by the kubelet: it serves the configuration it persisted
// in the pod's runtime volume (meshlet_xds_persisted_config 1), becomes
// ready, and the client's calls keep succeeding through both sidecars.
func TestControlPlaneOutage(t *testing.T) {
	ctx := need(t)
	needSubcommand(t, "webhook")
	needSubcommand(t, "discovery")
	const ns = "cp-outage"
	installMeshlet(t, ctx, ns)
	kubectl(t, ctx, nil, "create", "namespace", ns)
	kubectl(t, ctx, nil, "label", "namespace", ns, "istio-injection=enabled")

	scaleDiscovery(t, ctx, 0)
	kubectl(t, ctx, nil, "apply", "-n", ns, "-f", "test/e2e/testdata/app.yaml")
	var echo *corev1.Pod
	var ready string
	if err := cluster.WaitFor(ctx, 90*time.Second, "echo's istio-proxy answering 15021", func(ctx context.Context) error {
		pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=echo"})
		if err != nil || len(pods.Items) != 1 || pods.Items[0].Status.PodIP == "" {
			return fmt.Errorf("no echo pod with an IP yet (%v)", err)
		}
		echo = &pods.Items[0]
		code, body, err := healthz(ctx, echo)
		if err != nil {
			return err
		}
		ready = fmt.Sprintf("%d %q", code, body)
		return nil
	}); err != nil {
		dumpDiagnostics(t, ctx, ns)
		t.Fatal(err)
	}
	// Give it well past the proxy's initial wait (5 s): still not ready.
	time.Sleep(8 * time.Second)
	code, body, err := healthz(ctx, echo)
	if err != nil {
		t.Fatal(err)
	}
	if code != http.StatusServiceUnavailable {
		t.Errorf("istio-proxy with no control plane: /healthz/ready %d %q (first %s); want 503", code, body, ready)
	}
	if p, err := cs.CoreV1().Pods(ns).Get(ctx, echo.Name, metav1.GetOptions{}); err != nil {
		t.Fatal(err)
	} else {
		for _, st := range p.Status.ContainerStatuses {
			if st.Name == "echo" && st.State.Running != nil {
				t.Errorf("the app container runs although istio-proxy has no configuration: %+v", st.State)
			}
		}
	}
	t.Logf("no control plane: istio-proxy answers /healthz/ready %d %q, the app waits", code, body)

	scaleDiscovery(t, ctx, 2)
	if _, err := kc.Kubectl(ctx, nil, "wait", "-n", ns, "--for=condition=Available", "deployment/echo", "deployment/client", "--timeout=120s"); err != nil {
		dumpDiagnostics(t, ctx, ns)
		t.Fatal(err)
	}
	assertTrafficThroughSidecars(t, ctx, ns)

	scaleDiscovery(t, ctx, 0)
	echo = runningPod(t, ctx, ns, "app=echo")
	before, err := proxyRestarts(ctx, ns, echo.Name)
	if err != nil {
		t.Fatal(err)
	}
	if code, body := curlIn(t, ctx, podNetns(t, ctx, echo), "POST", "http://127.0.0.1:15020/quitquitquit"); code != 200 {
		t.Fatalf("POST /quitquitquit in the pod: %d %s", code, body)
	}
	var persisted float64
	if err := cluster.WaitFor(ctx, 90*time.Second, "echo's istio-proxy restarted and ready on its persisted configuration", func(ctx context.Context) error {
		n, err := proxyRestarts(ctx, ns, echo.Name)
		if err != nil {
			return err
		}
		if n == before {
			return fmt.Errorf("istio-proxy restart count still %d", n)
		}
		if code, body, err := healthz(ctx, echo); err != nil || code != http.StatusOK {
			return fmt.Errorf("/healthz/ready %d %q %v", code, body, err)
		}
		if persisted, _, err = scrape(ctx, echo, "meshlet_xds_persisted_config"); err != nil {
			return err
		}
		return nil
	}); err != nil {
		dumpDiagnostics(t, ctx, ns)
		t.Fatal(err)
	}
	if persisted != 1 {
		t.Errorf("restarted istio-proxy with the control plane down: meshlet_xds_persisted_config %v, want 1", persisted)
	}
	assertTrafficThroughSidecars(t, ctx, ns)
}
