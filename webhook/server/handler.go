package server

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strconv"
	"time"

	"github.com/go-logr/logr"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/meshlet/meshlet/webhook/inject"
)

// NamespaceGetter returns what injection needs to know about a namespace.
type NamespaceGetter interface {
	Namespace(ctx context.Context, name string) (inject.Namespace, error)
}

// Handler is the admission handler: it decodes the pod, asks the injection
// core, and answers with a JSON patch computed by
// admission.PatchResponseFromRaw.
//
// The patch is the difference between the request's pod decoded and
// re-encoded by our types, and the injected pod. It therefore holds only the
// injector's own changes; applied by the API server to the raw object it
// leaves every field our k8s.io/api does not know untouched (a diff against
// the raw bytes themselves would remove them).
type Handler struct {
	// Config returns the injection config in use (ConfigSource.Current).
	Config func() *inject.Config
	// Namespaces looks up the pod's namespace (labels decide injection).
	Namespaces NamespaceGetter
	// Options for the core; the webhook sets RequireOptIn.
	Options inject.Options
	// Metrics to count in (may be nil).
	Metrics *Metrics
	Log     logr.Logger
}

var _ admission.Handler = (*Handler)(nil)

// Handle answers one admission request.
func (h *Handler) Handle(ctx context.Context, req admission.Request) admission.Response {
	start := time.Now()
	dryRun := req.DryRun != nil && *req.DryRun
	resp, outcome := h.handle(ctx, req, dryRun)
	if m := h.Metrics; m != nil {
		m.RequestsTotal.WithLabelValues(strconv.FormatBool(dryRun)).Inc()
		m.Duration.Observe(time.Since(start).Seconds())
		if !dryRun {
			switch outcome.kind {
			case outcomeInjected:
				m.InjectionsTotal.Inc()
			case outcomeSkipped:
				m.SkipsTotal.WithLabelValues(outcome.reason).Inc()
			case outcomeDenied:
				m.DenialsTotal.WithLabelValues(outcome.reason).Inc()
			}
		}
		if outcome.kind == outcomeError {
			m.ErrorsTotal.WithLabelValues(outcome.reason).Inc()
		}
	}
	if h.Log.V(1).Enabled() {
		h.Log.V(1).Info("Admission", "namespace", req.Namespace, "name", req.Name, "uid", string(req.UID),
			"dryRun", dryRun, "outcome", outcome.kind, "reason", outcome.reason, "allowed", resp.Allowed)
	}
	return resp
}

type outcomeKind string

const (
	outcomeInjected outcomeKind = "injected"
	outcomeSkipped  outcomeKind = "skipped"
	outcomeDenied   outcomeKind = "denied"
	outcomeError    outcomeKind = "error"
	outcomeIgnored  outcomeKind = "ignored"
)

type outcome struct {
	kind   outcomeKind
	reason string
}

var podResource = struct{ group, version, resource string }{"", "v1", "pods"}

func (h *Handler) handle(ctx context.Context, req admission.Request, dryRun bool) (admission.Response, outcome) {
	if req.Resource.Group != podResource.group || req.Resource.Resource != podResource.resource ||
		req.SubResource != "" || req.Operation != admissionv1.Create {
		return admission.Allowed("meshlet injects only on pod creation"), outcome{outcomeIgnored, "not a pod creation"}
	}
	if len(req.Object.Raw) == 0 {
		return admission.Errored(http.StatusBadRequest, fmt.Errorf("admission request %s has no object", req.UID)),
			outcome{outcomeError, "decode"}
	}
	var pod corev1.Pod
	if err := json.Unmarshal(req.Object.Raw, &pod); err != nil {
		return admission.Errored(http.StatusBadRequest, fmt.Errorf("decoding pod: %w", err)), outcome{outcomeError, "decode"}
	}
	nsName := req.Namespace
	if nsName == "" {
		nsName = pod.Namespace
	}
	if pod.Namespace == "" {
		pod.Namespace = nsName
	}
	ns, err := h.Namespaces.Namespace(ctx, nsName)
	if err != nil {
		return admission.Errored(http.StatusInternalServerError, fmt.Errorf("looking up namespace %q: %w", nsName, err)),
			outcome{outcomeError, "namespace"}
	}
	cfg := h.Config()
	out, d, err := inject.Inject(&pod, ns, cfg, h.Options)
	if err != nil {
		resp := admission.Denied(err.Error())
		resp.Warnings = d.Warnings
		return resp, outcome{outcomeDenied, string(d.Reason)}
	}
	if !d.Injected {
		resp := admission.Allowed(d.Message)
		resp.Warnings = d.Warnings
		return resp, outcome{outcomeSkipped, string(d.Reason)}
	}
	// Encode the request's pod as our types see it, then the injected pod:
	// the patch between them is exactly what injection changed.
	before, err := json.Marshal(&pod)
	if err != nil {
		return admission.Errored(http.StatusInternalServerError, fmt.Errorf("encoding pod: %w", err)), outcome{outcomeError, "encode"}
	}
	after, err := json.Marshal(out)
	if err != nil {
		return admission.Errored(http.StatusInternalServerError, fmt.Errorf("encoding injected pod: %w", err)), outcome{outcomeError, "encode"}
	}
	resp := admission.PatchResponseFromRaw(before, after)
	if !resp.Allowed {
		return resp, outcome{outcomeError, "encode"}
	}
	resp.Result = nil
	resp.Warnings = d.Warnings
	return resp, outcome{outcomeInjected, string(d.Reason)}
}

// Webhook wraps h for controller-runtime's webhook server (panics are
// recovered into a 500 response).
func (h *Handler) Webhook() *admission.Webhook {
	return (&admission.Webhook{Handler: h}).WithRecoverPanic(true)
}
