package cni

import (
	"fmt"
	"strings"

	"github.com/meshlet/meshlet/initcni/capture"
)

// Pod annotations (Istio's vocabulary) that shape capture.
const (
	AnnotationStatus                  = "sidecar.istio.io/status"
	AnnotationInterceptionMode        = "sidecar.istio.io/interceptionMode"
	AnnotationIncludeInboundPorts     = "traffic.sidecar.istio.io/includeInboundPorts"
	AnnotationExcludeInboundPorts     = "traffic.sidecar.istio.io/excludeInboundPorts"
	AnnotationIncludeOutboundIPRanges = "traffic.sidecar.istio.io/includeOutboundIPRanges"
	AnnotationExcludeOutboundIPRanges = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
	AnnotationIncludeOutboundPorts    = "traffic.sidecar.istio.io/includeOutboundPorts"
	AnnotationExcludeOutboundPorts    = "traffic.sidecar.istio.io/excludeOutboundPorts"
	AnnotationExcludeInterfaces       = "traffic.sidecar.istio.io/excludeInterfaces"
)

// annotationFields maps each capture annotation to the Options field it sets.
var annotationFields = []struct {
	annotation string
	field      string
	set        func(*capture.Options, string)
}{
	{AnnotationInterceptionMode, "InterceptionMode", func(o *capture.Options, v string) { o.InterceptionMode = v }},
	{AnnotationIncludeInboundPorts, "InboundPorts", func(o *capture.Options, v string) { o.InboundPorts = v }},
	// Added to the configured defaults, as Istio does.
	{AnnotationExcludeInboundPorts, "InboundPortsExclude", func(o *capture.Options, v string) {
		if strings.TrimSpace(o.InboundPortsExclude) == "" {
			o.InboundPortsExclude = v
		} else if strings.TrimSpace(v) != "" {
			o.InboundPortsExclude += "," + v
		}
	}},
	{AnnotationIncludeOutboundIPRanges, "OutboundIPRanges", func(o *capture.Options, v string) { o.OutboundIPRanges = v }},
	{AnnotationExcludeOutboundIPRanges, "OutboundIPRangesExclude", func(o *capture.Options, v string) { o.OutboundIPRangesExclude = v }},
	{AnnotationIncludeOutboundPorts, "OutboundPorts", func(o *capture.Options, v string) { o.OutboundPorts = v }},
	{AnnotationExcludeOutboundPorts, "OutboundPortsExclude", func(o *capture.Options, v string) { o.OutboundPortsExclude = v }},
	{AnnotationExcludeInterfaces, "ExcludeInterfaces", func(o *capture.Options, v string) { o.ExcludeInterfaces = v }},
}

// Injected reports whether the pod carries the injector's status annotation.
func Injected(annotations map[string]string) bool {
	_, ok := annotations[AnnotationStatus]
	return ok
}

// ConfigFromAnnotations derives the capture Config for a pod from its
// annotations on top of defaults — the same mapping the injector uses for
// istio-init's flags. Every invalid value is reported, naming the
// annotation (or the plugin config key when the default is at fault).
func ConfigFromAnnotations(defaults capture.Options, annotations map[string]string) (capture.Config, error) {
	o := defaults
	from := map[string]string{} // field → annotation that set it
	for _, a := range annotationFields {
		if v, ok := annotations[a.annotation]; ok {
			a.set(&o, v)
			from[a.field] = a.annotation
		}
	}
	namer := func(field string) string {
		if a, ok := from[field]; ok {
			return "annotation " + a
		}
		return "plugin config capture." + jsonName(field)
	}
	c, err := capture.BuildConfigNamed(o, namer)
	if err != nil {
		return capture.Config{}, fmt.Errorf("pod capture annotations: %w", err)
	}
	return c, nil
}
