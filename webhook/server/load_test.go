package server

import (
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/webhook/inject"
)

// TestEnvtestLoad creates pods at a fixed rate against the envtest API
// server, first in a namespace the webhook never sees (baseline), then in a
// labelled one, and logs p50/p99 of pod creation as the client sees it and
// of the webhook's own handling (from its latency histogram). It asserts that
// no creation failed and that the webhook handled exactly one request per pod
// created in the labelled namespace. In the normal envtest run it is short
// (20 pods/s for 2 s per phase); the measuring run loads the machine for
// ~40 s:
//
//	MESHLET_WEBHOOK_LOAD=200 KUBEBUILDER_ASSETS=$(test/bin/build-k8s.sh --print-dir) \
//	  go test ./webhook/server -run TestEnvtestLoad -v
func TestEnvtestLoad(t *testing.T) {
	rate, dur := 20, 2*time.Second
	if v := os.Getenv("MESHLET_WEBHOOK_LOAD"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			t.Fatalf("MESHLET_WEBHOOK_LOAD=%q: want a positive number of pods per second", v)
		}
		rate, dur = n, 10*time.Second
	}
	c := startCluster(t, clusterOptions{})

	// The same pod already injected (by the same core and config), created
	// where the webhook is not called: same object size in etcd, no call.
	cfg := c.srv.Config.Current()
	preinjected, _, err := inject.Inject(testPod("", nil, nil), inject.Namespace{Name: "plain"}, cfg, inject.Options{AutoNativeSidecar: true})
	if err != nil {
		t.Fatal(err)
	}
	run := func(ns, prefix string, pod *corev1.Pod) []time.Duration {
		var (
			mu    sync.Mutex
			lat   []time.Duration
			fails int
			wg    sync.WaitGroup
			sem   = make(chan struct{}, 64)
		)
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		end := time.Now().Add(dur)
		for i := 0; time.Now().Before(end); i++ {
			<-tick.C
			sem <- struct{}{}
			wg.Add(1)
			go func(i int) {
				defer func() { <-sem; wg.Done() }()
				start := time.Now()
				p := pod.DeepCopy()
				p.Name = fmt.Sprintf("%s-%d", prefix, i)
				_, err := c.kube.CoreV1().Pods(ns).Create(t.Context(), p, metav1.CreateOptions{})
				d := time.Since(start)
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					fails++
					return
				}
				lat = append(lat, d)
			}(i)
		}
		wg.Wait()
		if fails > 0 {
			t.Errorf("%s: %d pod creations failed", ns, fails)
		}
		slices.Sort(lat)
		return lat
	}
	base := run("plain", "base", testPod("", nil, nil))
	pre := run("plain", "pre", preinjected)
	m := c.srv.Metrics
	before := histogram(t, m)
	requests := testutil.ToFloat64(m.RequestsTotal.WithLabelValues("false"))
	with := run("apps", "load", testPod("", nil, nil))
	after := histogram(t, m)
	if got := testutil.ToFloat64(m.RequestsTotal.WithLabelValues("false")) - requests; got != float64(len(with)) {
		t.Errorf("webhook handled %v requests for %d pods created in the labelled namespace", got, len(with))
	}

	q := func(l []time.Duration, p float64) time.Duration {
		if len(l) == 0 {
			return 0
		}
		return l[int(math.Ceil(p*float64(len(l))))-1]
	}
	achieved := func(l []time.Duration) float64 { return float64(len(l)) / dur.Seconds() }
	t.Logf("target %d pods/s for %v each", rate, dur)
	t.Logf("baseline (no webhook call): %d pods (%.0f/s)  create p50 %v  p99 %v", len(base), achieved(base), q(base, .5), q(base, .99))
	t.Logf("pre-injected, no webhook:   %d pods (%.0f/s)  create p50 %v  p99 %v", len(pre), achieved(pre), q(pre, .5), q(pre, .99))
	t.Logf("with injection:             %d pods (%.0f/s)  create p50 %v  p99 %v  (vs pre-injected: p50 %.2fx, p99 %.2fx)",
		len(with), achieved(with), q(with, .5), q(with, .99),
		float64(q(with, .5))/float64(q(pre, .5)), float64(q(with, .99))/float64(q(pre, .99)))
	t.Logf("webhook handling (histogram, %d requests): p50 ≤ %s  p99 ≤ %s",
		after.count-before.count, after.quantile(before, .5), after.quantile(before, .99))
}

type histSnap struct {
	count   uint64
	buckets []uint64
	bounds  []float64
}

func histogram(t *testing.T, m *Metrics) histSnap {
	t.Helper()
	var pb dto.Metric
	if err := m.Duration.Write(&pb); err != nil {
		t.Fatal(err)
	}
	h := pb.GetHistogram()
	s := histSnap{count: h.GetSampleCount()}
	for _, b := range h.GetBucket() {
		s.buckets = append(s.buckets, b.GetCumulativeCount())
		s.bounds = append(s.bounds, b.GetUpperBound())
	}
	return s
}

// quantile returns the upper bound of the bucket holding the p-quantile of
// the observations made between base and s.
func (s histSnap) quantile(base histSnap, p float64) string {
	total := s.count - base.count
	if total == 0 {
		return "n/a"
	}
	want := uint64(math.Ceil(p * float64(total)))
	for i := range s.buckets {
		if s.buckets[i]-base.buckets[i] >= want {
			return (time.Duration(s.bounds[i] * float64(time.Second))).String()
		}
	}
	return fmt.Sprintf("> %v", time.Duration(s.bounds[len(s.bounds)-1]*float64(time.Second)))
}
