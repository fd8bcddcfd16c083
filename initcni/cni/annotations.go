package cni

import (
	"fmt"
	"strings"

	"github.com/meshlet/meshlet/initcni/capture"
)

// Injected reports whether the pod carries the injector's status annotation.
func Injected(annotations map[string]string) bool {
	_, ok := annotations[capture.AnnotationStatus]
	return ok
}

// CaptureFor is the plugin's decision for a pod with these annotations:
// whether its traffic is captured (it carries the injector's status
// annotation and its interception mode is not NONE), why, and with which
// Config (ConfigFromAnnotations on top of defaults).
func CaptureFor(defaults capture.Options, annotations map[string]string) (c capture.Config, captured bool, why string, err error) {
	if !Injected(annotations) {
		return capture.Config{}, false, fmt.Sprintf("is not injected (no %s annotation)", capture.AnnotationStatus), nil
	}
	if strings.EqualFold(strings.TrimSpace(annotations[capture.AnnotationInterceptionMode]), string(capture.ModeNone)) {
		return capture.Config{}, false, fmt.Sprintf("has %s=%s: no capture", capture.AnnotationInterceptionMode, capture.ModeNone), nil
	}
	c, err = ConfigFromAnnotations(defaults, annotations)
	if err != nil {
		return capture.Config{}, false, "", err
	}
	return c, true, "is injected", nil
}

// ConfigFromAnnotations derives the capture Config for a pod from its
// annotations on top of defaults — the same mapping (capture.ApplyAnnotations)
// the injector uses for istio-init's flags. Every invalid value is reported,
// naming the annotation (or the plugin config key when the default is at
// fault). The Config's Warnings name the annotation the same way.
func ConfigFromAnnotations(defaults capture.Options, annotations map[string]string) (capture.Config, error) {
	o := defaults
	from := capture.ApplyAnnotations(&o, annotations)
	namer := func(field string) string {
		if a, ok := from[field]; ok {
			return "annotation " + a
		}
		return "plugin config capture." + jsonName(field)
	}
	// Messages show an annotation's value as the pod carries it, not merged
	// with the defaults it adds to.
	shown := map[string]string{}
	for field, a := range from {
		shown[field] = annotations[a]
	}
	c, err := capture.BuildConfigShowing(o, namer, shown)
	if err != nil {
		return capture.Config{}, fmt.Errorf("pod capture annotations: %w", err)
	}
	return c, nil
}
