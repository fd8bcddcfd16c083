package inject_test

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	jsonpatch "github.com/evanphx/json-patch/v5"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/yaml"

	"github.com/meshlet/meshlet/webhook/inject"
	"github.com/meshlet/meshlet/webhook/server"
)

// podTemplates returns the pod templates of a manifest stream (as JSON,
// with the namespace of their object), in document order: Pods, objects
// with spec.template, CronJobs, List items. It mirrors package manifest's
// walk in a few lines, so the two paths are found independently.
func podTemplates(t *testing.T, data []byte) []struct {
	ns  string
	pod json.RawMessage
} {
	t.Helper()
	var out []struct {
		ns  string
		pod json.RawMessage
	}
	var walk func(obj map[string]any)
	walk = func(obj map[string]any) {
		kind, _ := obj["kind"].(string)
		meta, _ := obj["metadata"].(map[string]any)
		ns, _ := meta["namespace"].(string)
		if items, ok := obj["items"].([]any); ok && strings.HasSuffix(kind, "List") {
			for _, it := range items {
				if m, ok := it.(map[string]any); ok {
					walk(m)
				}
			}
			return
		}
		var tmpl any
		spec, _ := obj["spec"].(map[string]any)
		switch kind {
		case "Pod":
			tmpl = obj
		case "CronJob":
			jt, _ := spec["jobTemplate"].(map[string]any)
			js, _ := jt["spec"].(map[string]any)
			tmpl = js["template"]
		default:
			tmpl = spec["template"]
		}
		m, ok := tmpl.(map[string]any)
		if !ok {
			return
		}
		if s, _ := m["spec"].(map[string]any); s == nil || s["containers"] == nil {
			return
		}
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, struct {
			ns  string
			pod json.RawMessage
		}{ns, b})
	}
	for _, doc := range bytes.Split(data, []byte("\n---")) {
		var obj map[string]any
		if err := yaml.Unmarshal(doc, &obj); err != nil || obj == nil {
			continue
		}
		walk(obj)
	}
	return out
}

// admit sends pod through the real admission handler (over HTTP, as the API
// server does) and returns the patched pod, or nil when not patched.
func admit(t *testing.T, h http.Handler, ns string, pod []byte) []byte {
	t.Helper()
	ar := admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID: "golden", Kind: metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
			Resource:  metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
			Namespace: ns, Operation: admissionv1.Create, Object: runtime.RawExtension{Raw: pod},
		},
	}
	body, err := json.Marshal(ar)
	if err != nil {
		t.Fatal(err)
	}
	rec := httptest.NewRecorder()
	req := httptest.NewRequest(http.MethodPost, "/inject", bytes.NewReader(body))
	req.Header.Set("Content-Type", "application/json")
	h.ServeHTTP(rec, req)
	var resp admissionv1.AdmissionReview
	if err := json.Unmarshal(rec.Body.Bytes(), &resp); err != nil || resp.Response == nil {
		t.Fatalf("admission response (HTTP %d): %v %s", rec.Code, err, rec.Body)
	}
	if !resp.Response.Allowed {
		t.Fatalf("admission denied: %+v", resp.Response.Result)
	}
	if len(resp.Response.Patch) == 0 {
		return nil
	}
	p, err := jsonpatch.DecodePatch(resp.Response.Patch)
	if err != nil {
		t.Fatal(err)
	}
	out, err := p.Apply(pod)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// comparablePod decodes a pod template for comparison across the two paths:
// the status annotation is read as data (the CLI records the pod's own
// containers in the manifest's key order and the fields it held empty).
func comparablePod(t *testing.T, raw []byte) *corev1.Pod {
	t.Helper()
	var pod corev1.Pod
	if err := json.Unmarshal(raw, &pod); err != nil {
		t.Fatal(err)
	}
	pod.Name, pod.Namespace = "", ""
	st, ok, err := inject.ParseStatus(&pod)
	if err != nil {
		t.Fatal(err)
	}
	if ok {
		st.EmptyFields = nil
		for i, o := range st.Overrides {
			var c corev1.Container
			if err := json.Unmarshal(o.Container, &c); err != nil {
				t.Fatal(err)
			}
			st.Overrides[i].Container, _ = json.Marshal(c)
		}
		b, _ := json.Marshal(st)
		pod.Annotations[inject.AnnotationStatus] = string(b)
	}
	return &pod
}

// checkWebhookPath runs every pod template of input through the admission
// handler and checks the pod equals the CLI's (cliOut), that re-admitting
// it changes nothing, and that Uninject gives back the input pod (as
// uninjected).
func checkWebhookPath(t *testing.T, cfg *inject.Config, opts inject.Options, input, cliOut []byte) {
	t.Helper()
	h := (&server.Handler{
		Config:     func() *inject.Config { return cfg },
		Namespaces: server.StaticNamespaces{},
		Options:    opts,
	}).Webhook()
	ins, outs := podTemplates(t, input), podTemplates(t, cliOut)
	if len(ins) != len(outs) {
		t.Fatalf("webhook path: %d pod templates in, %d out", len(ins), len(outs))
	}
	for i, in := range ins {
		name := fmt.Sprintf("pod template %d", i+1)
		ns := in.ns
		if ns == "" {
			ns = "default"
		}
		// The API server sends (and patches) the object as its types
		// encode it.
		var typed corev1.Pod
		if err := json.Unmarshal(in.pod, &typed); err != nil {
			t.Fatal(err)
		}
		sent, err := json.Marshal(&typed)
		if err != nil {
			t.Fatal(err)
		}
		got := admit(t, h, ns, sent)
		if got == nil {
			got = sent
		}
		if want := comparablePod(t, outs[i].pod); !apiequality.Semantic.DeepEqual(comparablePod(t, got), want) {
			a, _ := yaml.Marshal(comparablePod(t, got))
			b, _ := yaml.Marshal(want)
			t.Fatalf("webhook path, %s: the webhook's pod differs from the CLI's:\n%s", name, lineDiff(string(b), string(a)))
		}
		if again := admit(t, h, ns, got); again != nil {
			t.Fatalf("webhook path, %s: re-admission patched the injected pod", name)
		}
		var injected corev1.Pod
		if err := json.Unmarshal(got, &injected); err != nil {
			t.Fatal(err)
		}
		back, err := inject.Uninject(&injected)
		if err != nil {
			t.Fatalf("webhook path, %s: uninject: %v", name, err)
		}
		// Compared with the input uninjected (an already injected input
		// loses its sidecar too).
		orig, err := inject.Uninject(&typed)
		if err != nil {
			t.Fatal(err)
		}
		if !apiequality.Semantic.DeepEqual(back, orig) {
			a, _ := yaml.Marshal(back)
			b, _ := yaml.Marshal(orig)
			t.Fatalf("webhook path, %s: uninject does not restore the pod:\n%s", name, lineDiff(string(b), string(a)))
		}
	}
}
