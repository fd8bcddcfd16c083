package inject

import (
	"fmt"
	"net"
	"slices"
	"sort"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/validation"
)

// ModeNone is Istio's interception mode without capture: no capture rules,
// the application talks to the proxy explicitly.
const ModeNone = "NONE"

// AnnotationTemplates selects the injection templates of a pod: a comma
// list of names of Config.Templates (Istio's inject.istio.io/templates).
const AnnotationTemplates = "inject.istio.io/templates"

// ProxyMode says whether and how a template injects istio-proxy.
type ProxyMode string

// The proxy modes of a Template.
const (
	// ProxyNone injects no istio-proxy.
	ProxyNone ProxyMode = ""
	// ProxySidecar injects istio-proxy as the pod's sidecar: a native
	// sidecar or the classic layout, by Config.NativeSidecar.
	ProxySidecar ProxyMode = "sidecar"
	// ProxyGateway injects istio-proxy as the pod's main container (an
	// ingress or egress gateway): among the containers, where the pod
	// declares its own istio-proxy, never a native sidecar, capture
	// listeners off.
	ProxyGateway ProxyMode = "gateway"
)

// Template is one entry of Config.Templates: a description of what to
// inject, as data. A pod's templates (inject.istio.io/templates, else
// Config.DefaultTemplates) are combined in order: the switches are or-ed,
// the containers and volumes added in turn.
type Template struct {
	// Capture adds the capture init container (istio-init, or
	// istio-validation in CNI mode) and the proxy's capture listeners
	// (15001, 15006), unless the pod's interception mode is NONE.
	Capture bool `json:"capture,omitempty"`
	// Proxy injects istio-proxy: sidecar, gateway or "" (none).
	Proxy ProxyMode `json:"proxy,omitempty"`
	// GRPCBootstrap adds the init container grpc-bootstrap-init, which
	// writes the proxyless gRPC bootstrap file (pointing at
	// Config.DiscoveryAddress), and points every app container at it
	// (env GRPC_XDS_BOOTSTRAP and a read-only mount).
	GRPCBootstrap bool `json:"grpcBootstrap,omitempty"`
	// InitContainers and Containers are merged over the injected container
	// of the same name (strategic merge, the template wins; image "auto"
	// keeps the injected image), or added when no injected container has
	// that name. A pod's own container of that name is merged last.
	InitContainers []corev1.Container `json:"initContainers,omitempty"`
	Containers     []corev1.Container `json:"containers,omitempty"`
	// Volumes are added to the pod.
	Volumes []corev1.Volume `json:"volumes,omitempty"`
}

// ImageAuto as a container's image, in a pod's own istio-proxy or a
// template's container, means the injected image (Istio's convention).
const ImageAuto = "auto"

// The proxyless gRPC bootstrap.
const (
	// ContainerGRPCBootstrap writes the bootstrap file.
	ContainerGRPCBootstrap = "grpc-bootstrap-init"
	// VolumeGRPC holds the bootstrap file.
	VolumeGRPC = "meshlet-grpc"
	// GRPCDir is where VolumeGRPC is mounted.
	GRPCDir = "/var/run/meshlet-grpc"
	// GRPCBootstrapFile is the bootstrap file's path in every container.
	GRPCBootstrapFile = GRPCDir + "/bootstrap.json"
	// EnvGRPCBootstrap is the variable gRPC's xDS support reads.
	EnvGRPCBootstrap = "GRPC_XDS_BOOTSTRAP"
)

// plan is what a pod's templates inject, combined.
type plan struct {
	names          []string
	capture        bool
	proxy          ProxyMode
	grpc           bool
	initContainers []corev1.Container
	containers     []corev1.Container
	volumes        []corev1.Volume
}

// isDefaultSidecar reports whether p is the stock sidecar injection.
func (p *plan) isDefaultSidecar() bool {
	return p.capture && p.proxy == ProxySidecar && !p.grpc &&
		len(p.initContainers)+len(p.containers)+len(p.volumes) == 0
}

// selectTemplates combines the templates named by the pod's annotation, or
// the config's defaults.
func selectTemplates(ann map[string]string, cfg *Config) (plan, error) {
	names := cfg.DefaultTemplates
	v, fromAnn := ann[AnnotationTemplates]
	if fromAnn {
		names = splitList(v)
		if len(names) == 0 {
			return plan{}, &AnnotationError{Key: AnnotationTemplates, Value: v, Problem: "names no template (known: " + knownTemplates(cfg) + ")"}
		}
	}
	fail := func(problem string) (plan, error) {
		if fromAnn {
			return plan{}, &AnnotationError{Key: AnnotationTemplates, Value: v, Problem: problem}
		}
		return plan{}, &FieldError{Field: "defaultTemplates", Value: strings.Join(cfg.DefaultTemplates, ","), Problem: problem}
	}
	var p plan
	proxyFrom := ""
	for _, n := range names {
		t, ok := cfg.Templates[n]
		if !ok {
			return fail(fmt.Sprintf("unknown template %q (known: %s)", n, knownTemplates(cfg)))
		}
		if slices.Contains(p.names, n) {
			return fail(fmt.Sprintf("template %q is listed twice", n))
		}
		p.names = append(p.names, n)
		p.capture = p.capture || t.Capture
		p.grpc = p.grpc || t.GRPCBootstrap
		if t.Proxy != ProxyNone {
			if p.proxy != ProxyNone && p.proxy != t.Proxy {
				return fail(fmt.Sprintf("templates %q (proxy: %s) and %q (proxy: %s) inject istio-proxy differently", proxyFrom, p.proxy, n, t.Proxy))
			}
			p.proxy, proxyFrom = t.Proxy, n
		}
		p.initContainers = append(p.initContainers, t.InitContainers...)
		p.containers = append(p.containers, t.Containers...)
		p.volumes = append(p.volumes, t.Volumes...)
	}
	return p, nil
}

func knownTemplates(cfg *Config) string {
	names := make([]string, 0, len(cfg.Templates))
	for n := range cfg.Templates {
		names = append(names, n)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// validateTemplates checks Templates and DefaultTemplates.
func (c *Config) validateTemplates() []error {
	var errs []error
	bad := func(field, value, problem string) {
		errs = append(errs, &FieldError{Field: field, Value: value, Problem: problem})
	}
	names := make([]string, 0, len(c.Templates))
	for n := range c.Templates {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		t := c.Templates[n]
		f := "templates." + n
		if msgs := validation.IsDNS1123Subdomain(n); len(msgs) > 0 {
			bad(f, n, "not a template name: "+strings.Join(msgs, "; "))
		}
		switch t.Proxy {
		case ProxyNone, ProxySidecar, ProxyGateway:
		default:
			bad(f+".proxy", string(t.Proxy), `must be sidecar, gateway or ""`)
		}
		for _, l := range []struct {
			field string
			cs    []corev1.Container
		}{{"initContainers", t.InitContainers}, {"containers", t.Containers}} {
			for i, ctr := range l.cs {
				if msgs := validation.IsDNS1123Label(ctr.Name); len(msgs) > 0 {
					bad(fmt.Sprintf("%s.%s[%d].name", f, l.field, i), ctr.Name, strings.Join(msgs, "; "))
				}
			}
		}
		for i, v := range t.Volumes {
			if msgs := validation.IsDNS1123Label(v.Name); len(msgs) > 0 {
				bad(fmt.Sprintf("%s.volumes[%d].name", f, i), v.Name, strings.Join(msgs, "; "))
			}
			if v.Name == VolumeRuntime || v.Name == VolumeGRPC {
				bad(fmt.Sprintf("%s.volumes[%d].name", f, i), v.Name, "is the name of a volume meshlet injects")
			}
		}
	}
	if len(c.DefaultTemplates) == 0 {
		bad("defaultTemplates", "", "must name at least one template")
	}
	for _, n := range c.DefaultTemplates {
		if _, ok := c.Templates[n]; !ok {
			bad("defaultTemplates", strings.Join(c.DefaultTemplates, ","), fmt.Sprintf("unknown template %q (known: %s)", n, knownTemplates(c)))
		}
	}
	if len(errs) == 0 {
		// The combination must hold together too (proxy modes agree).
		if _, err := selectTemplates(nil, c); err != nil {
			errs = append(errs, err)
		}
	}
	return errs
}

// checkHostPort checks a host:port address.
func checkHostPort(s string) error {
	host, port, err := net.SplitHostPort(s)
	if err != nil || host == "" {
		return fmt.Errorf("not host:port (e.g. istiod.meshlet-system.svc:15010)")
	}
	if n, err := strconv.Atoi(port); err != nil || n < 1 || n > 65535 {
		return fmt.Errorf("port %q is not 1-65535", port)
	}
	return nil
}
