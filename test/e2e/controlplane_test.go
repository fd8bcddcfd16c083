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
// discovery scaled to zero a new pod's istio-proxy runs but is not ready
// and, as a native sidecar, holds the app container back; once discovery
// is back the pods start and traffic flows through both sidecars. Then,
// with discovery down again, the server's istio-proxy is stopped (POST
// /quitquitquit from inside the pod) and restarted by the kubelet: it
// serves the configuration it persisted in the pod's runtime volume
// (meshlet_xds_persisted_config 1), becomes ready, and the client's calls
// keep succeeding through both sidecars. The chart runs without its CA
// here (discovery.ca.enabled=false): the workload certificate is not kept
// across a container restart, so with the CA down too a restarted sidecar
// would wait for one.
func TestControlPlaneOutage(t *testing.T) {
	ctx := need(t)
	needSubcommand(t, "webhook")
	needSubcommand(t, "discovery")
	const ns = "cp-outage"
	installMeshletWith(t, ctx, []string{"--set", "discovery.ca.enabled=false"}, ns)
	kubectl(t, ctx, nil, "create", "namespace", ns)
	kubectl(t, ctx, nil, "label", "namespace", ns, "istio-injection=enabled")

	scaleDiscovery(t, ctx, 0)
	kubectl(t, ctx, nil, "apply", "-n", ns, "-f", "test/e2e/testdata/app.yaml")
	var echo *corev1.Pod
	if err := cluster.WaitFor(ctx, 90*time.Second, "echo's istio-proxy running", func(ctx context.Context) error {
		pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{LabelSelector: "app=echo"})
		if err != nil || len(pods.Items) != 1 {
			return fmt.Errorf("no echo pod yet (%v)", err)
		}
		echo = &pods.Items[0]
		for _, st := range echo.Status.InitContainerStatuses {
			if st.Name == "istio-proxy" && st.State.Running != nil {
				return nil
			}
		}
		return fmt.Errorf("istio-proxy not running yet")
	}); err != nil {
		dumpDiagnostics(t, ctx, ns)
		t.Fatal(err)
	}
	// Well past the proxy's initial wait (5 s): still not ready.
	time.Sleep(10 * time.Second)
	code, body, err := healthz(ctx, echo)
	if err != nil || code != http.StatusServiceUnavailable || !strings.Contains(body, "no complete configuration") {
		t.Errorf("istio-proxy with no control plane: /healthz/ready %d %q %v; want 503 saying it has no complete configuration", code, body, err)
	}
	p, err := cs.CoreV1().Pods(ns).Get(ctx, echo.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, st := range append(append([]corev1.ContainerStatus(nil), p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...) {
		if st.Name == "istio-proxy" && st.Ready {
			t.Errorf("istio-proxy is ready with no control plane")
		}
		if st.Name == "echo" && st.State.Running != nil {
			t.Errorf("the app container runs although istio-proxy has no configuration: %+v", st.State)
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
