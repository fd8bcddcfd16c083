package server

import (
	"context"
	"sync"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/record"

	"github.com/meshlet/meshlet/webhook/discovery/translate"
)

// EventComponent is the source of the Events the control plane records.
const EventComponent = "meshlet-discovery"

// eventSink records a Warning Event on every resource the translation
// refuses, once per distinct warning while it lasts.
type eventSink struct {
	mu          sync.Mutex
	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder
	emitted     map[string]bool
	log         logr.Logger
}

func newEventSink(ctx context.Context, kube kubernetes.Interface, log logr.Logger) *eventSink {
	b := record.NewBroadcasterWithCorrelatorOptions(record.CorrelatorOptions{})
	b.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: kube.CoreV1().Events("")})
	_ = ctx
	return &eventSink{broadcaster: b, recorder: b.NewRecorder(scheme.Scheme, corev1.EventSource{Component: EventComponent}),
		emitted: map[string]bool{}, log: log}
}

func (e *eventSink) stop() { e.broadcaster.Shutdown() }

func (e *eventSink) warn(ws []translate.Warning) {
	if e == nil {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	now := map[string]bool{}
	for _, w := range ws {
		key := w.UID + "\x00" + w.String()
		now[key] = true
		if e.emitted[key] {
			continue
		}
		ref := &corev1.ObjectReference{Kind: w.Kind, APIVersion: apiVersion(w.Kind), Namespace: w.Namespace, Name: w.Name,
			UID: typesUID(w.UID)}
		e.recorder.Event(ref, corev1.EventTypeWarning, w.Reason, w.Message)
		e.log.Info("configuration refused", "kind", w.Kind, "namespace", w.Namespace, "name", w.Name, "reason", w.Reason, "message", w.Message)
	}
	e.emitted = now
}

// apiVersion is the group/version of a kind the translation reads.
func apiVersion(kind string) string {
	switch kind {
	case "AuthorizationPolicy", "PeerAuthentication":
		return "security.istio.io/v1"
	}
	return "networking.istio.io/v1"
}
