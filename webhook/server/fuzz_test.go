package server

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"

	admissionv1 "k8s.io/api/admission/v1"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"
)

// fuzzServe posts body and checks the answer is a well-formed AdmissionReview
// (controller-runtime reports a bad request as a response with a 4xx code) or
// a 4xx; anything else — a panic, a 5xx, garbage — fails.
func fuzzServe(t *testing.T, h http.Handler, body []byte) {
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodPost, "/inject", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	h.ServeHTTP(rec, req)
	if rec.Code >= 400 && rec.Code < 500 {
		return
	}
	if rec.Code != http.StatusOK {
		t.Fatalf("HTTP %d for %q", rec.Code, body)
	}
	var out admissionv1.AdmissionReview
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil || out.Response == nil {
		t.Fatalf("malformed response %q (%v) for %q", rec.Body, err, body)
	}
	if r := out.Response.Result; r != nil && r.Code >= 500 {
		t.Fatalf("internal error %d %q for %q", r.Code, r.Message, body)
	}
	if out.Response.Allowed && len(out.Response.Patch) > 0 {
		var ops []map[string]any
		if err := json.Unmarshal(out.Response.Patch, &ops); err != nil {
			t.Fatalf("patch is not a JSON patch: %v", err)
		}
	}
}

// fuzzHandler is the real handler without panic recovery, so a panic fails
// the fuzz run instead of becoming a 500.
func fuzzHandler(t testing.TB) http.Handler {
	hh, _ := testHandler(t)
	return &admission.Webhook{Handler: hh}
}

// FuzzHandler feeds arbitrary AdmissionReview bodies to the HTTP handler.
//
//	go test ./webhook/server -run '^$' -fuzz FuzzHandler -fuzztime 60s
func FuzzHandler(f *testing.F) {
	f.Add(reviewBody(f, podJSON("apps", ""), "apps", false))
	f.Add(reviewBody(f, podJSON("plain", `,"labels":{"sidecar.istio.io/inject":"true"}`), "plain", true))
	f.Add(reviewBody(f, podJSON("apps", `,"annotations":{"traffic.sidecar.istio.io/excludeInboundPorts":"1,2,x"}`), "apps", false))
	f.Add([]byte(`{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview","request":{"uid":"x","resource":{"version":"v1","resource":"pods"},"operation":"CREATE","object":null}}`))
	f.Add([]byte(`{"request":{"object":{"spec":{"containers":[null]}},"resource":{"resource":"pods"},"operation":"CREATE"}}`))
	f.Add([]byte(`{}`))
	f.Add([]byte(`[`))
	h := fuzzHandler(f)
	f.Fuzz(func(t *testing.T, body []byte) { fuzzServe(t, h, body) })
}

// FuzzHandlerPod keeps the review well-formed and fuzzes the pod inside it,
// which reaches the injection core and the patch computation.
//
//	go test ./webhook/server -run '^$' -fuzz FuzzHandlerPod -fuzztime 60s
func FuzzHandlerPod(f *testing.F) {
	f.Add(podJSON("apps", ""), "apps", false)
	f.Add(podJSON("apps", `,"annotations":{"sidecar.istio.io/proxyCPU":"-1","proxy.istio.io/config":"holdApplicationUntilProxyStarts: yes"}`), "apps", false)
	f.Add(podJSON("plain", `,"labels":{"sidecar.istio.io/inject":"true"},"annotations":{"sidecar.istio.io/nativeSidecar":"false"}`), "plain", true)
	f.Add([]byte(`{"spec":{"hostNetwork":true,"initContainers":[{"name":"istio-proxy"}],"containers":[]}}`), "apps", false)
	f.Add([]byte(`{"metadata":{"annotations":{"sidecar.istio.io/status":"{garbage"}}}`), "apps", false)
	h := fuzzHandler(f)
	f.Fuzz(func(t *testing.T, pod []byte, ns string, dryRun bool) {
		body, err := reviewBodyErr(pod, ns, dryRun)
		if err != nil {
			t.Skip("not JSON: the API server never sends it")
		}
		fuzzServe(t, h, body)
	})
}
