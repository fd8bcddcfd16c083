package inject

import "github.com/meshlet/meshlet/initcni/capture"

// Labels and annotations meshlet reads and writes: Istio's vocabulary.
const (
	// LabelNamespaceInjection on a namespace: "enabled" or "disabled".
	LabelNamespaceInjection = "istio-injection"
	// LabelInject on a pod: "true" or "false". The annotation of the same
	// name is the deprecated form; the label wins.
	LabelInject = "sidecar.istio.io/inject"
	// AnnotationInject is the deprecated annotation form of LabelInject.
	AnnotationInject = "sidecar.istio.io/inject"

	// AnnotationStatus records what injection added (JSON, see Status).
	AnnotationStatus = capture.AnnotationStatus
	// AnnotationDefaultContainer and AnnotationDefaultLogsContainer point
	// kubectl at the first app container.
	AnnotationDefaultContainer     = "kubectl.kubernetes.io/default-container"
	AnnotationDefaultLogsContainer = "kubectl.kubernetes.io/default-logs-container"

	// The capture annotations are the capture option set's (initcni/capture),
	// which `meshlet init` and the CNI plugin read too.
	AnnotationIncludeInboundPorts     = capture.AnnotationIncludeInboundPorts
	AnnotationExcludeInboundPorts     = capture.AnnotationExcludeInboundPorts
	AnnotationIncludeOutboundIPRanges = capture.AnnotationIncludeOutboundIPRanges
	AnnotationExcludeOutboundIPRanges = capture.AnnotationExcludeOutboundIPRanges
	AnnotationIncludeOutboundPorts    = capture.AnnotationIncludeOutboundPorts
	AnnotationExcludeOutboundPorts    = capture.AnnotationExcludeOutboundPorts
	AnnotationExcludeInterfaces       = capture.AnnotationExcludeInterfaces

	AnnotationProxyCPU         = "sidecar.istio.io/proxyCPU"
	AnnotationProxyMemory      = "sidecar.istio.io/proxyMemory"
	AnnotationProxyCPULimit    = "sidecar.istio.io/proxyCPULimit"
	AnnotationProxyMemoryLimit = "sidecar.istio.io/proxyMemoryLimit"
	AnnotationProxyImage       = "sidecar.istio.io/proxyImage"
	AnnotationInterceptionMode = capture.AnnotationInterceptionMode
	AnnotationNativeSidecar    = "sidecar.istio.io/nativeSidecar"
	// AnnotationProxyConfig holds a YAML/JSON ProxyConfig fragment; meshlet
	// reads holdApplicationUntilProxyStarts and terminationDrainDuration.
	AnnotationProxyConfig = "proxy.istio.io/config"
)

// Names of what injection adds.
const (
	ContainerInit       = "istio-init"
	ContainerValidation = "istio-validation"
	ContainerProxy      = "istio-proxy"
	VolumeRuntime       = "meshlet-runtime"
	// RuntimeDir is where the runtime volume is mounted.
	RuntimeDir = "/var/run/meshlet"
	// Binary is the meshlet binary's path in the image.
	Binary = "/usr/local/bin/meshlet"
)
