package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/test/cluster"
)

// batch is what the load driver (test/images/client -serve) answers for
// one batch of calls.
type batch struct {
	Calls       int            `json:"calls"`
	Servers     map[string]int `json:"servers"`
	Statuses    map[string]int `json:"statuses"`
	Errors      int            `json:"errors"`
	FirstErrors []string       `json:"firstErrors"`
	// Echoed counts the 2xx answers by the value of the request header the
	// echo server received under the name given as echoHeader.
	Echoed map[string]int `json:"echoed"`
	// Bodies counts the answers that are not 2xx by their (trimmed) body.
	Bodies map[string]int `json:"bodies"`
}

func (b batch) String() string {
	s := fmt.Sprintf("%d calls: servers %v statuses %v errors %d %v", b.Calls, b.Servers, b.Statuses, b.Errors, b.FirstErrors)
	if len(b.Echoed) > 0 {
		s += fmt.Sprintf(" echoed %v", b.Echoed)
	}
	if len(b.Bodies) > 0 {
		s += fmt.Sprintf(" bodies %v", b.Bodies)
	}
	return s
}

// driverRun asks the load driver in pod (test/images/client -serve) for
// one batch of calls: q holds url and n, and optionally method, header
// (NAME:VALUE, repeated) and echoHeader.
func driverRun(ctx context.Context, driver *corev1.Pod, q url.Values) (batch, error) {
	ctx, cancel := context.WithTimeout(ctx, 90*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+driver.Status.PodIP+":8081/run?"+q.Encode(), nil)
	if err != nil {
		return batch{}, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return batch{}, fmt.Errorf("load driver %s/%s: %w", driver.Namespace, driver.Name, err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		return batch{}, fmt.Errorf("load driver %s/%s: %s: %s", driver.Namespace, driver.Name, resp.Status, body)
	}
	var b batch
	if err := json.Unmarshal(body, &b); err != nil {
		return batch{}, fmt.Errorf("load driver answer %q: %w", body, err)
	}
	return b, nil
}

// canary is the test's view of the canary namespace: the load driver pod
// and which reviews pod is which.
type canary struct {
	ns      string
	driver  *corev1.Pod
	version map[string]string // reviews pod name → v1, v1-failing, v2
}

// run asks the driver for n calls of http://reviews:9080/ with the given
// headers (NAME:VALUE).
func (c *canary) run(ctx context.Context, n int, headers ...string) (batch, error) {
	return driverRun(ctx, c.driver, url.Values{"url": {"http://reviews:9080/"}, "n": {fmt.Sprint(n)}, "header": headers})
}

// byVersion counts a batch's 2xx answers by the version of the pod that
// served them.
func (c *canary) byVersion(b batch) (map[string]int, error) {
	out := map[string]int{}
	for pod, n := range b.Servers {
		v, ok := c.version[pod]
		if !ok {
			return nil, fmt.Errorf("answered by %s, not a reviews pod of this test", pod)
		}
		out[v] += n
	}
	return out, nil
}

// split checks that every call of b got 200 from a healthy pod and that
// v2 served want2 (a fraction) of them within tolerance.
func (c *canary) split(b batch, want2, tolerance float64) error {
	if b.Errors > 0 || b.Statuses["200"] != b.Calls {
		return fmt.Errorf("not every call answered 200: %v", b)
	}
	v, err := c.byVersion(b)
	if err != nil {
		return err
	}
	if v["v1"]+v["v2"] != b.Calls {
		return fmt.Errorf("answers by version %v for %d calls", v, b.Calls)
	}
	if got := float64(v["v2"]) / float64(b.Calls); got < want2-tolerance || got > want2+tolerance {
		return fmt.Errorf("v2 served %.1f%% (%v), want %.0f%% ± %.0f points", 100*got, v, 100*want2, 100*tolerance)
	}
	return nil
}

// converge applies a traffic config and waits until a probe batch shows it
// serves (ok), returning how long that took.
func (c *canary) converge(t *testing.T, ctx context.Context, file, what string, ok func(batch) error) time.Duration {
	t.Helper()
	start := time.Now()
	kubectl(t, ctx, nil, "apply", "-n", c.ns, "-f", file)
	var last batch
	if err := cluster.WaitFor(ctx, 60*time.Second, what, func(ctx context.Context) error {
		b, err := c.run(ctx, 100)
		if err != nil {
			return err
		}
		last = b
		return ok(b)
	}); err != nil {
		t.Fatalf("%v; last probe: %v", err, last)
	}
	return time.Since(start)
}

// restarts returns every pod of ns by name with its UID and total
// container restarts.
func restarts(ctx context.Context, ns string) (map[string]string, error) {
	pods, err := cs.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, err
	}
	out := map[string]string{}
	for _, p := range pods.Items {
		var n int32
		for _, st := range append(append([]corev1.ContainerStatus(nil), p.Status.InitContainerStatuses...), p.Status.ContainerStatuses...) {
			n += st.RestartCount
		}
		out[p.Name] = fmt.Sprintf("uid %s, %d restarts", p.UID, n)
	}
	return out, nil
}

// TestCanary is Istio's canary through chart-installed sidecars that take
// their configuration from the chart's control plane: reviews v1 (one
// healthy pod, one answering 500 to everything) and v2 behind one Service,
// a meshed client calling reviews. Istio's VirtualService and
// DestinationRule applied with kubectl: 1000 calls split 90/10 (± 5 points)
// with zero errors although a v1 pod fails every request (retries hide
// it, and are counted; without the VirtualService its 500s reach the
// client); a header match (end-user: jason) goes to v2 only; the
// DestinationRule's outlier detection ejects the failing pod (no more
// retries); editing the VirtualService moves the split to 10/90; a 50%
// fault abort answers 418 to half the calls (± 5 points). No pod restarts
// or is replaced throughout.
func TestCanary(t *testing.T) {
	ctx := need(t)
	needSubcommand(t, "webhook")
	needSubcommand(t, "discovery")
	const ns = "canary"
	installMeshlet(t, ctx, ns)
	kubectl(t, ctx, nil, "create", "namespace", ns)
	kubectl(t, ctx, nil, "label", "namespace", ns, "istio-injection=enabled")
	kubectl(t, ctx, nil, "apply", "-n", ns, "-f", "test/e2e/testdata/canary/app.yaml")
	if _, err := kc.Kubectl(ctx, nil, "wait", "-n", ns, "--for=condition=Available", "--timeout=180s",
		"deployment/reviews-v1", "deployment/reviews-v1-failing", "deployment/reviews-v2", "deployment/loadgen"); err != nil {
		dumpDiagnostics(t, ctx, ns)
		t.Fatal(err)
	}
	c := &canary{ns: ns, driver: runningPod(t, ctx, ns, "app=loadgen"), version: map[string]string{}}
	assertInjected(t, c.driver)
	for sel, v := range map[string]string{"version=v1,failing=no": "v1", "version=v1,failing=yes": "v1-failing", "version=v2": "v2"} {
		pod := runningPod(t, ctx, ns, "app=reviews,"+sel)
		assertInjected(t, pod)
		c.version[pod.Name] = v
	}
	before, err := restarts(ctx, ns)
	if err != nil {
		t.Fatal(err)
	}

	// Without a VirtualService every reviews pod serves (Istio's default
	// retries do not cover a 500): the failing pod really fails.
	var noVS batch
	if err := cluster.WaitFor(ctx, 60*time.Second, "all three reviews pods answering", func(ctx context.Context) error {
		b, err := c.run(ctx, 60)
		if err != nil {
			return err
		}
		noVS = b
		v, err := c.byVersion(b)
		if err != nil {
			return err
		}
		if v["v1"] == 0 || v["v2"] == 0 || b.Statuses["500"] == 0 {
			return fmt.Errorf("not every pod answered yet: %v", b)
		}
		return nil
	}); err != nil {
		dumpDiagnostics(t, ctx, ns)
		t.Fatalf("%v; last: %v", err, noVS)
	}
	t.Logf("without a VirtualService: %v", noVS)

	took := c.converge(t, ctx, "test/e2e/testdata/canary/traffic.yaml", "the VirtualService serving", func(b batch) error {
		j, err := c.run(ctx, 20, "end-user:jason")
		if err != nil {
			return err
		}
		if v, err := c.byVersion(j); err != nil || v["v2"] != j.Calls {
			return fmt.Errorf("header match not in force yet: %v", j)
		}
		return c.split(b, 0.10, 0.15)
	})
	t.Logf("VirtualService and DestinationRule applied and serving after %s", took.Round(10*time.Millisecond))

	// The client sidecar's retries of the v1 subset's cluster.
	retries := func(t *testing.T) float64 {
		t.Helper()
		n, _, err := scrape(ctx, c.driver, "meshlet_l7_upstream_retries_total", `cluster="outbound|9080|v1|reviews.`+ns+`.svc.cluster.local"`)
		if err != nil {
			t.Fatal(err)
		}
		return n
	}

	t.Run("90/10 split, retries hide the failing pod", func(t *testing.T) {
		r0 := retries(t)
		b, err := c.run(ctx, 1000)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.split(b, 0.10, 0.05); err != nil {
			t.Error(err)
		}
		r := retries(t) - r0
		// LEAST_REQUEST over the two v1 pods sends the failing one a share
		// of v1's calls; each is retried on the healthy pod.
		if r == 0 {
			t.Error("the client's sidecar retried no v1 request: the failing pod was not hit, so the window proves nothing")
		}
		t.Logf("1000 calls: %v, %v of them retried", b, r)
	})

	t.Run("header match goes to v2 only", func(t *testing.T) {
		b, err := c.run(ctx, 200, "end-user:jason")
		if err != nil {
			t.Fatal(err)
		}
		if err := c.split(b, 1, 0); err != nil {
			t.Error(err)
		}
		t.Logf("end-user: jason: %v", b)
	})

	t.Run("outlier detection ejects the failing pod", func(t *testing.T) {
		var r0 float64
		took := c.converge(t, ctx, "test/e2e/testdata/canary/outlier.yaml", "the failing pod ejected", func(b batch) error {
			// The batch that ejects it may still retry; the next one
			// must not.
			r := retries(t)
			defer func() { r0 = r }()
			if err := c.split(b, 0.10, 0.15); err != nil {
				return err
			}
			if r != r0 {
				return fmt.Errorf("%v retries during the probe", r-r0)
			}
			return nil
		})
		r1 := retries(t)
		b, err := c.run(ctx, 1000)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.split(b, 0.10, 0.05); err != nil {
			t.Error(err)
		}
		if r := retries(t) - r1; r != 0 {
			t.Errorf("%v retries of v1 with the failing pod ejected", r)
		}
		ej, _, err := scrape(ctx, c.driver, "meshlet_l7_outlier_ejections_total", `cluster="outbound|9080|v1|reviews.`+ns+`.svc.cluster.local"`)
		if err != nil || ej == 0 {
			t.Errorf("meshlet_l7_outlier_ejections_total of v1 = %v (%v), want the ejection counted", ej, err)
		}
		t.Logf("ejected after %s; 1000 calls: %v without a retry", took.Round(10*time.Millisecond), b)
	})

	t.Run("editing the VirtualService moves traffic", func(t *testing.T) {
		took := c.converge(t, ctx, "test/e2e/testdata/canary/flipped.yaml", "the flipped weights serving", func(b batch) error {
			return c.split(b, 0.90, 0.15)
		})
		b, err := c.run(ctx, 1000)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.split(b, 0.90, 0.05); err != nil {
			t.Error(err)
		}
		t.Logf("weights 10/90 serving after %s; 1000 calls: %v", took.Round(10*time.Millisecond), b)
	})

	t.Run("fault abort of 50%", func(t *testing.T) {
		took := c.converge(t, ctx, "test/e2e/testdata/canary/fault.yaml", "the fault serving", func(b batch) error {
			if b.Statuses["418"] == 0 {
				return fmt.Errorf("no 418 yet: %v", b)
			}
			return nil
		})
		b, err := c.run(ctx, 1000)
		if err != nil {
			t.Fatal(err)
		}
		aborted, ok := b.Statuses["418"], b.Statuses["200"]
		var errs []error
		if b.Errors > 0 || aborted+ok != b.Calls {
			errs = append(errs, fmt.Errorf("answers other than 418 and 200: %v", b))
		}
		if f := float64(aborted) / float64(b.Calls); f < 0.45 || f > 0.55 {
			errs = append(errs, fmt.Errorf("%.1f%% aborted with 418, want 50%% ± 5 points", 100*f))
		}
		if err := errors.Join(errs...); err != nil {
			t.Error(err)
		}
		t.Logf("fault serving after %s; 1000 calls: %v", took.Round(10*time.Millisecond), b)
	})

	after, err := restarts(ctx, ns)
	if err != nil {
		t.Fatal(err)
	}
	if !maps.Equal(before, after) {
		t.Errorf("pods restarted or replaced while the traffic config changed:\nbefore %v\nafter  %v", before, after)
	}
	if t.Failed() {
		for _, pod := range []string{c.driver.Name} {
			out, _ := kc.Kubectl(ctx, nil, "logs", "-n", ns, pod, "-c", "istio-proxy", "--tail=40")
			t.Logf("istio-proxy of %s:\n%s", pod, strings.TrimSpace(string(out)))
		}
	}
}
