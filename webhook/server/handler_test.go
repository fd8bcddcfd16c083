package server

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	jsonpatch "github.com/evanphx/json-patch/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"

	"github.com/meshlet/meshlet/webhook/inject"
)

// testHandler is the real handler with the default config and a fixed set
// of namespaces, wrapped in controller-runtime's HTTP adapter.
func testHandler(t testing.TB) (*Handler, http.Handler) {
	t.Helper()
	cfg := inject.DefaultConfig()
	cfg.WebhookNamespace = "meshlet-system"
	h := &Handler{
		Config: func() *inject.Config { return &cfg },
		Namespaces: StaticNamespaces{
			"apps":     {Name: "apps", Labels: map[string]string{"istio-injection": "enabled"}},
			"plain":    {Name: "plain"},
			"disabled": {Name: "disabled", Labels: map[string]string{"istio-injection": "disabled"}},
		},
		Options: inject.Options{RequireOptIn: true, AutoNativeSidecar: true},
		Metrics: NewMetrics(prometheus.NewRegistry()),
	}
	return h, h.Webhook()
}

const appPod = `{"apiVersion":"v1","kind":"Pod","metadata":{"name":"web","namespace":"%NS%"%META%},
 "spec":{"futureSpecField":{"kept":true},"containers":[{"name":"app","image":"nginx:1.27","futureContainerField":7,"ports":[{"containerPort":8080}]}]}}`

func podJSON(ns, meta string) []byte {
	return []byte(strings.NewReplacer("%NS%", ns, "%META%", meta).Replace(appPod))
}

func reviewBody(t testing.TB, raw []byte, ns string, dryRun bool) []byte {
	t.Helper()
	b, err := reviewBodyErr(raw, ns, dryRun)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func reviewBodyErr(raw []byte, ns string, dryRun bool) ([]byte, error) {
	ar := admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID:       types.UID("uid-1"),
			Kind:      metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
			Resource:  metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
			Namespace: ns,
			Operation: admissionv1.Create,
			Object:    runtime.RawExtension{Raw: raw},
			DryRun:    &dryRun,
		},
	}
	return json.Marshal(ar)
}

func post(t testing.TB, h http.Handler, body []byte) *admissionv1.AdmissionResponse {
	t.Helper()
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodPost, "/inject", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	h.ServeHTTP(rec, req)
	if rec.Code != http.StatusOK {
		t.Fatalf("HTTP %d: %s", rec.Code, rec.Body)
	}
	var out admissionv1.AdmissionReview
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil || out.Response == nil {
		t.Fatalf("malformed AdmissionReview response (%v): %s", err, rec.Body)
	}
	return out.Response
}

func applyPatch(t *testing.T, raw []byte, resp *admissionv1.AdmissionResponse) []byte {
	t.Helper()
	if len(resp.Patch) == 0 {
		return raw
	}
	p, err := jsonpatch.DecodePatch(resp.Patch)
	if err != nil {
		t.Fatalf("decoding patch: %v", err)
	}
	out, err := p.Apply(raw)
	if err != nil {
		t.Fatalf("applying patch: %v", err)
	}
	return out
}

func TestHandler(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name        string
		ns, meta    string
		wantAllowed bool
		wantInject  bool
		wantMsg     string // substring of the denial / result message
		wantWarning string // substring of one warning
	}{
		{name: "labelled namespace", ns: "apps", wantAllowed: true, wantInject: true},
		{name: "plain namespace", ns: "plain", wantAllowed: true},
		{name: "plain namespace, pod opts in", ns: "plain", meta: `,"labels":{"sidecar.istio.io/inject":"true"}`, wantAllowed: true, wantInject: true},
		{name: "opt-out", ns: "apps", meta: `,"labels":{"sidecar.istio.io/inject":"false"}`, wantAllowed: true},
		{name: "kube-system, opted in", ns: "kube-system", meta: `,"labels":{"sidecar.istio.io/inject":"true"}`, wantAllowed: true, wantWarning: "not injected"},
		{name: "own namespace", ns: "meshlet-system", meta: `,"labels":{"sidecar.istio.io/inject":"true"}`, wantAllowed: true},
		{name: "deprecated annotation", ns: "plain", meta: `,"annotations":{"sidecar.istio.io/inject":"true"}`, wantAllowed: true, wantInject: true, wantWarning: "deprecated"},
		{name: "invalid annotation", ns: "apps", meta: `,"annotations":{"traffic.sidecar.istio.io/excludeInboundPorts":"http"}`,
			wantMsg: "traffic.sidecar.istio.io/excludeInboundPorts"},
		{name: "invalid inject label", ns: "apps", meta: `,"labels":{"sidecar.istio.io/inject":"maybe"}`, wantMsg: "sidecar.istio.io/inject"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, h := testHandler(t)
			raw := podJSON(tt.ns, tt.meta)
			resp := post(t, h, reviewBody(t, raw, tt.ns, false))
			if resp.UID != "uid-1" {
				t.Errorf("response UID %q, want the request's", resp.UID)
			}
			if resp.Allowed != tt.wantAllowed {
				t.Fatalf("allowed = %v, want %v (%+v)", resp.Allowed, tt.wantAllowed, resp.Result)
			}
			if tt.wantMsg != "" && (resp.Result == nil || !strings.Contains(resp.Result.Message, tt.wantMsg)) {
				t.Errorf("result %+v does not name %q", resp.Result, tt.wantMsg)
			}
			if tt.wantWarning != "" && !strings.Contains(strings.Join(resp.Warnings, "\n"), tt.wantWarning) {
				t.Errorf("warnings %q lack %q", resp.Warnings, tt.wantWarning)
			}
			if got := len(resp.Patch) > 0; got != tt.wantInject {
				t.Fatalf("patched = %v, want %v: %s", got, tt.wantInject, resp.Patch)
			}
			if !tt.wantInject {
				return
			}
			out := applyPatch(t, raw, resp)
			var pod corev1.Pod
			if err := json.Unmarshal(out, &pod); err != nil {
				t.Fatal(err)
			}
			if _, ok := pod.Annotations[inject.AnnotationStatus]; !ok {
				t.Errorf("no %s annotation after the patch", inject.AnnotationStatus)
			}
			if !hasContainer(&pod, inject.ContainerProxy) {
				t.Error("no istio-proxy after the patch")
			}
			// Fields our k8s.io/api does not know survive the patch.
			for _, f := range []string{`"futureSpecField":{"kept":true}`, `"futureContainerField":7`} {
				if !bytes.Contains(out, []byte(f)) {
					t.Errorf("patched pod lost %s:\n%s", f, out)
				}
			}
			// Re-invocation (reinvocationPolicy: IfNeeded) changes nothing.
			again := post(t, h, reviewBody(t, out, tt.ns, false))
			if !again.Allowed || len(again.Patch) > 0 {
				t.Errorf("re-invocation: allowed=%v patch=%s, want allowed without patch", again.Allowed, again.Patch)
			}
		})
	}
}

func hasContainer(pod *corev1.Pod, name string) bool {
	for _, cs := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, c := range cs {
			if c.Name == name {
				return true
			}
		}
	}
	return false
}

func TestHandlerDryRunCountsNoInjection(t *testing.T) {
	t.Parallel()
	hh, h := testHandler(t)
	resp := post(t, h, reviewBody(t, podJSON("apps", ""), "apps", true))
	if !resp.Allowed || len(resp.Patch) == 0 {
		t.Fatalf("dry-run must inject like a real request: allowed=%v patch=%d bytes", resp.Allowed, len(resp.Patch))
	}
	m := hh.Metrics
	if got := testutil.ToFloat64(m.InjectionsTotal); got != 0 {
		t.Errorf("injections_total = %v after a dry-run, want 0", got)
	}
	if got := testutil.ToFloat64(m.RequestsTotal.WithLabelValues("true")); got != 1 {
		t.Errorf(`requests_total{dry_run="true"} = %v, want 1`, got)
	}
	post(t, h, reviewBody(t, podJSON("apps", ""), "apps", false))
	post(t, h, reviewBody(t, podJSON("plain", ""), "plain", false))
	if got := testutil.ToFloat64(m.InjectionsTotal); got != 1 {
		t.Errorf("injections_total = %v after one real injection, want 1", got)
	}
	if got := testutil.ToFloat64(m.SkipsTotal.WithLabelValues(string(inject.ReasonNamespaceNotEnabled))); got != 1 {
		t.Errorf("skips_total{reason=NamespaceNotEnabled} = %v, want 1", got)
	}
}

func TestHandlerIgnoresOtherRequests(t *testing.T) {
	t.Parallel()
	_, h := testHandler(t)
	var ar admissionv1.AdmissionReview
	if err := json.Unmarshal(reviewBody(t, podJSON("apps", ""), "apps", false), &ar); err != nil {
		t.Fatal(err)
	}
	for name, mutate := range map[string]func(r *admissionv1.AdmissionRequest){
		"update":      func(r *admissionv1.AdmissionRequest) { r.Operation = admissionv1.Update },
		"subresource": func(r *admissionv1.AdmissionRequest) { r.SubResource = "ephemeralcontainers" },
		"service":     func(r *admissionv1.AdmissionRequest) { r.Resource.Resource = "services" },
	} {
		r := ar.DeepCopy()
		mutate(r.Request)
		b, _ := json.Marshal(r)
		resp := post(t, h, b)
		if !resp.Allowed || len(resp.Patch) != 0 {
			t.Errorf("%s: allowed=%v patch=%s, want allowed untouched", name, resp.Allowed, resp.Patch)
		}
	}
	// A pod that does not decode is a 400 inside a well-formed response.
	resp := post(t, h, reviewBody(t, []byte(`{"spec":{"containers":"nope"}}`), "apps", false))
	if resp.Allowed || resp.Result == nil || resp.Result.Code != http.StatusBadRequest {
		t.Errorf("undecodable pod: %+v, want a 400 denial", resp.Result)
	}
}
