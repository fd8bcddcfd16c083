package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
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
// refuses, once per distinct warning while it lasts, and one Event across
// replicas (oneEventSink).
type eventSink struct {
	mu          sync.Mutex
	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder
	emitted     map[string]bool
	log         logr.Logger
}

func newEventSink(ctx context.Context, kube kubernetes.Interface, log logr.Logger) *eventSink {
	b := record.NewBroadcasterWithCorrelatorOptions(record.CorrelatorOptions{})
	b.StartRecordingToSink(oneEventSink{&typedcorev1.EventSinkImpl{Interface: kube.CoreV1().Events("")}})
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

// oneEventSink names each new Event after what it says about which object
// (NAME.HASH of the object's UID, kind, reason and message) instead of the
// recorder's NAME.TIMESTAMP. Every replica refuses the same objects and
// records the same Events; with one name, the first replica's create makes
// the Event and the others' fail AlreadyExists, which client-go's
// broadcaster drops without retrying. N replicas make one Event, not N.
// A warning that goes away and comes back while its Event still exists
// (the API server keeps Events an hour) is not recorded again.
type oneEventSink struct{ record.EventSink }

// Create implements record.EventSink.
func (s oneEventSink) Create(e *corev1.Event) (*corev1.Event, error) {
	e = e.DeepCopy()
	e.Name = eventName(e)
	return s.EventSink.Create(e)
}

func eventName(e *corev1.Event) string {
	h := sha256.New()
	for _, f := range []string{string(e.InvolvedObject.UID), e.InvolvedObject.Kind, e.InvolvedObject.Name, e.Type, e.Reason, e.Message} {
		h.Write([]byte(f))
		h.Write([]byte{0})
	}
	name := e.InvolvedObject.Name
	if len(name) > 200 {
		name = name[:200]
	}
	return name + "." + hex.EncodeToString(h.Sum(nil))[:16]
}
