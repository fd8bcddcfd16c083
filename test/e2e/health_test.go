package e2e

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/test/cluster"
)

const (
	webhookNamespace    = "meshlet-system"
	webhookDeployment   = "meshlet-webhook"
	discoveryDeployment = "meshlet-discovery"
	discoveryService    = "istiod" // the chart's default, Istio's name
)

// steadyDeployments are the chart's Deployments (name → their Service) whose
// readiness must hold steady after install: the admission webhook and the
// control plane.
var steadyDeployments = [][2]string{{webhookDeployment, webhookDeployment}, {discoveryDeployment, discoveryService}}

// installMeshlet installs the chart as a user would (helm install --wait) on
// a clean slate, and uninstalls it when the test ends.
func installMeshlet(t *testing.T, ctx context.Context, namespaces ...string) {
	t.Helper()
	installMeshletWith(t, ctx, nil, namespaces...)
}

// installMeshletWith is installMeshlet with extra helm install arguments
// (--set ...).
func installMeshletWith(t *testing.T, ctx context.Context, args []string, namespaces ...string) {
	t.Helper()
	_, _ = kc.Helm(ctx, "uninstall", "meshlet", "--namespace", webhookNamespace, "--wait")
	for _, ns := range namespaces {
		if err := kc.DeleteNamespace(ctx, ns); err != nil {
			t.Fatal(err)
		}
	}
	helm(t, ctx, append([]string{"install", "meshlet", "charts/meshlet", "--namespace", webhookNamespace, "--create-namespace", "--wait", "--timeout", "5m"}, args...)...)
	t.Cleanup(func() {
		if t.Failed() {
			dumpDiagnostics(t, context.Background(), webhookNamespace)
		}
		_, _ = kc.Helm(context.Background(), "uninstall", "meshlet", "--namespace", webhookNamespace, "--wait")
		for _, ns := range namespaces {
			_ = kc.DeleteNamespace(context.Background(), ns)
		}
	})
}

// webhookHealth is one sample of the webhook Deployment's health.
type webhookHealth struct {
	want, ready, updated int32
	endpoints            int
}

func (h webhookHealth) ok() bool {
	return h.want > 0 && h.ready == h.want && h.updated == h.want && h.endpoints == int(h.want)
}

func (h webhookHealth) String() string {
	return fmt.Sprintf("%d/%d ready, %d updated, %d pods ready behind the Service", h.ready, h.want, h.updated, h.endpoints)
}

func sampleWebhook(ctx context.Context) (webhookHealth, error) {
	return sampleDeployment(ctx, webhookDeployment, webhookDeployment)
}

// sampleDeployment is one health sample of the chart's Deployment name and
// of the ready pods behind its Service svc.
func sampleDeployment(ctx context.Context, name, svc string) (webhookHealth, error) {
	var h webhookHealth
	dep, err := cs.AppsV1().Deployments(webhookNamespace).Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return h, err
	}
	if dep.Spec.Replicas != nil {
		h.want = *dep.Spec.Replicas
	}
	h.ready, h.updated = dep.Status.ReadyReplicas, dep.Status.UpdatedReplicas
	slices, err := cs.DiscoveryV1().EndpointSlices(webhookNamespace).List(ctx, metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + svc})
	if err != nil {
		return h, err
	}
	pods := map[string]bool{} // one per pod, whatever the address families
	for _, sl := range slices.Items {
		for _, ep := range sl.Endpoints {
			if ep.Conditions.Ready != nil && *ep.Conditions.Ready && ep.TargetRef != nil {
				pods[ep.TargetRef.Name] = true
			}
		}
	}
	h.endpoints = len(pods)
	return h, nil
}

// readinessFailures returns the "Readiness probe failed" events of the pods
// of the Deployment name that were seen at or after since. A probe the
// kubelet sends before a new pod's server listens is not a flap: helm install
// --wait (and a rollout) returns only once every pod was ready, so counting
// from then on catches a replica that drops out of readiness afterwards.
func readinessFailures(ctx context.Context, name string, since time.Time) ([]string, error) {
	evs, err := cs.CoreV1().Events(webhookNamespace).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.kind=Pod,reason=Unhealthy"})
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range evs.Items {
		last := e.LastTimestamp.Time
		if e.Series != nil {
			last = e.Series.LastObservedTime.Time
		}
		if strings.HasPrefix(e.InvolvedObject.Name, name+"-") && strings.Contains(e.Message, "Readiness probe failed") && !last.Before(since) {
			out = append(out, fmt.Sprintf("%s ×%d: %s", e.InvolvedObject.Name, e.Count, e.Message))
		}
	}
	return out, nil
}

// TestWebhookSteadyHealth: after helm install the webhook Deployment stays
// 2/2 ready with both replicas behind its Service in every sample (every 2 s
// for 60 s) and its pods get no "Readiness probe failed" event; then, during
// a rolling update of the webhook itself, every pod created in a labelled
// namespace is admitted and injected (failurePolicy: Fail, so a gap in the
// Service's endpoints would refuse it with "failed calling webhook").
func TestWebhookSteadyHealth(t *testing.T) {
	ctx := need(t)
	needSubcommand(t, "webhook")
	const ns = "health"
	installMeshlet(t, ctx, ns)
	// Event timestamps have one-second resolution: start at the next whole
	// second so a probe sent while a pod was still starting is not counted.
	since := time.Now().Truncate(time.Second).Add(time.Second)

	t.Run("steady after install", func(t *testing.T) {
		samples, bad := 0, map[string]int{}
		first := map[string]string{}
		for end := time.Now().Add(60 * time.Second); time.Now().Before(end); time.Sleep(2 * time.Second) {
			samples++
			for _, d := range steadyDeployments {
				name := d[0]
				h, err := sampleDeployment(ctx, name, d[1])
				if err != nil || !h.ok() {
					if bad[name]++; first[name] == "" {
						first[name] = fmt.Sprintf("%v %v", h, err)
					}
				}
			}
		}
		for _, d := range steadyDeployments {
			name := d[0]
			if bad[name] > 0 {
				t.Errorf("%s not fully ready in %d of %d samples over 60s; first: %s", name, bad[name], samples, first[name])
			}
			evs, err := readinessFailures(ctx, name, since)
			if err != nil {
				t.Fatal(err)
			}
			if len(evs) > 0 {
				t.Errorf("readiness probe failures of %s's pods after install:\n%s", name, strings.Join(evs, "\n"))
			}
			t.Logf("%s: %d samples, %d not fully ready", name, samples, bad[name])
		}
	})

	t.Run("pods admitted during a rolling update of the webhook", func(t *testing.T) {
		kubectl(t, ctx, nil, "create", "namespace", ns)
		kubectl(t, ctx, nil, "label", "namespace", ns, "istio-injection=enabled")
		kubectl(t, ctx, nil, "rollout", "restart", "-n", webhookNamespace, "deployment/"+webhookDeployment)
		rolled := make(chan error, 1)
		go func() {
			_, err := kc.Kubectl(ctx, nil, "rollout", "status", "-n", webhookNamespace, "deployment/"+webhookDeployment, "--timeout=5m")
			rolled <- err
		}()
		var created int
		var failures []string
		for done := false; !done; {
			select {
			case err := <-rolled:
				if err != nil {
					t.Fatalf("rollout: %v", err)
				}
				done = true
			case <-time.After(250 * time.Millisecond):
			}
			// Server-side dry run: admission (and injection) exactly as for
			// a real pod, without scheduling one per iteration.
			pod := &corev1.Pod{
				ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("during-rollout-%d", created)},
				Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "echo", Image: "meshlet/echo:0.1.0"}}},
			}
			created++
			got, err := cs.CoreV1().Pods(ns).Create(ctx, pod, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
			switch {
			case err != nil:
				failures = append(failures, err.Error())
			case findContainer(got, "istio-proxy") == nil:
				failures = append(failures, pod.Name+": admitted without the sidecar")
			}
		}
		// And one real pod once the new replicas serve.
		kubectl(t, ctx, nil, "apply", "-n", ns, "-f", "test/e2e/testdata/app.yaml")
		if _, err := kc.Kubectl(ctx, nil, "wait", "-n", ns, "--for=condition=Available", "deployment/echo", "--timeout=180s"); err != nil {
			t.Fatal(err)
		}
		assertInjected(t, runningPod(t, ctx, ns, "app=echo"))
		t.Logf("%d pods created during the rollout, %d refused or not injected", created, len(failures))
		if len(failures) > 0 {
			t.Errorf("pods refused during the webhook's rolling update:\n%s", strings.Join(failures, "\n"))
		}
		if err := cluster.WaitFor(ctx, 60*time.Second, "webhook fully ready after the rollout", func(ctx context.Context) error {
			h, err := sampleWebhook(ctx)
			if err != nil {
				return err
			}
			if !h.ok() {
				return fmt.Errorf("%v", h)
			}
			return nil
		}); err != nil {
			t.Error(err)
		}
	})
}
