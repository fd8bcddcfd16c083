package inject

import (
	_ "embed"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/validation"
	"sigs.k8s.io/yaml"
)

// APIVersion and Kind identify an injection config document.
const (
	APIVersion = "meshlet.io/v1alpha1"
	Kind       = "InjectionConfig"
)

//go:embed defaults.yaml
var defaultsYAML []byte

// DefaultsYAML returns the embedded defaults document, comments included (the
// Helm chart and `meshlet inject --print-config` show it).
func DefaultsYAML() []byte { return append([]byte(nil), defaultsYAML...) }

// Config is the injection config: the document of kind InjectionConfig,
// apiVersion meshlet.io/v1alpha1. The embedded defaults.yaml documents every
// field; DefaultConfig returns it, LoadConfig overlays a document on it.
type Config struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`

	// Image runs istio-init / istio-validation and istio-proxy.
	Image string `json:"image"`
	// ImagePullPolicy of the injected containers.
	ImagePullPolicy corev1.PullPolicy `json:"imagePullPolicy"`
	// WebhookNamespace is never injected.
	WebhookNamespace string `json:"webhookNamespace"`
	// Revision is recorded in the status annotation.
	Revision string `json:"revision"`
	// NativeSidecar chooses the sidecar layout: auto, true or false.
	NativeSidecar NativeSidecarMode `json:"nativeSidecar"`
	// HoldApplicationUntilProxyStarts puts istio-proxy first with a
	// postStart wait (classic layout).
	HoldApplicationUntilProxyStarts bool `json:"holdApplicationUntilProxyStarts"`
	// TerminationDrainDuration is the proxy's drain time, a Go duration.
	TerminationDrainDuration string `json:"terminationDrainDuration"`
	// AllowRemoteLifecycle lets callers outside the pod use istio-proxy's
	// state-changing status endpoints (POST /quitquitquit, /drain, /reload on
	// 15020); false: loopback only (`meshlet agent --allow-remote-lifecycle`).
	AllowRemoteLifecycle bool `json:"allowRemoteLifecycle"`
	// ProxyUID and ProxyGID are the identity of istio-proxy, exempt from capture.
	ProxyUID int64 `json:"proxyUID"`
	ProxyGID int64 `json:"proxyGID"`
	// Resources of the injected containers.
	Resources Resources `json:"resources"`
	// Capture holds the default `meshlet init` capture flags.
	Capture Capture `json:"capture"`
	// CNI switches to CNI mode.
	CNI CNI `json:"cni"`
	// DiscoveryAddress is the discovery service's plaintext xDS address
	// (host:port): the proxyless gRPC bootstrap file points there, and so
	// does istio-proxy (MESHLET_DISCOVERY_ADDRESS) unless CAAddress is set,
	// in which case istio-proxy takes its configuration from CAAddress (the
	// same server over TLS, with its workload certificate). Empty:
	// istio-proxy runs its static configuration, and the grpcBootstrap
	// templates are refused.
	DiscoveryAddress string `json:"discoveryAddress"`
	// CAAddress is the mesh CA's address (host:port, gRPC over TLS),
	// given to istio-proxy as MESHLET_CA_ADDRESS and, when DiscoveryAddress
	// is set too, as its xDS address (the CA's gRPC server carries ADS over
	// TLS); empty: none.
	CAAddress string `json:"caAddress"`
	// DefaultTemplates are injected into a pod without the
	// inject.istio.io/templates annotation.
	DefaultTemplates []string `json:"defaultTemplates"`
	// Templates are what inject.istio.io/templates selects, by name.
	Templates map[string]Template `json:"templates"`
}

// NativeSidecarMode is auto, true or false. In YAML it may be written as a
// string or as a boolean.
type NativeSidecarMode string

// The native sidecar modes.
const (
	NativeSidecarAuto  NativeSidecarMode = "auto"
	NativeSidecarTrue  NativeSidecarMode = "true"
	NativeSidecarFalse NativeSidecarMode = "false"
)

// UnmarshalJSON accepts "auto", "true", "false", true and false.
func (m *NativeSidecarMode) UnmarshalJSON(b []byte) error {
	var v any
	if err := json.Unmarshal(b, &v); err != nil {
		return err
	}
	switch v := v.(type) {
	case bool:
		*m = NativeSidecarFalse
		if v {
			*m = NativeSidecarTrue
		}
	case string:
		*m = NativeSidecarMode(v)
	default:
		return fmt.Errorf("nativeSidecar: %s is not auto, true or false", b)
	}
	return nil
}

// Resources are requests and limits; an empty quantity sets nothing.
type Resources struct {
	Requests ResourceList `json:"requests"`
	Limits   ResourceList `json:"limits"`
}

// ResourceList holds CPU and memory quantities as strings ("100m", "128Mi").
type ResourceList struct {
	CPU    string `json:"cpu"`
	Memory string `json:"memory"`
}

// Capture holds the capture settings, in the syntax of the
// traffic.sidecar.istio.io annotations: "*" everything, "" nothing, else a
// comma-separated list.
type Capture struct {
	InterceptionMode        string `json:"interceptionMode"`
	IncludeInboundPorts     string `json:"includeInboundPorts"`
	ExcludeInboundPorts     string `json:"excludeInboundPorts"`
	IncludeOutboundIPRanges string `json:"includeOutboundIPRanges"`
	ExcludeOutboundIPRanges string `json:"excludeOutboundIPRanges"`
	IncludeOutboundPorts    string `json:"includeOutboundPorts"`
	ExcludeOutboundPorts    string `json:"excludeOutboundPorts"`
	ExcludeInterfaces       string `json:"excludeInterfaces"`
}

// CNI configures CNI mode.
type CNI struct {
	// Enabled replaces istio-init by the unprivileged istio-validation.
	Enabled bool `json:"enabled"`
}

// FieldError is one problem of a config document: the field, its value and
// what is wrong.
type FieldError struct {
	Field   string
	Value   string
	Problem string
}

func (e *FieldError) Error() string {
	return fmt.Sprintf("config field %s=%q: %s", e.Field, e.Value, e.Problem)
}

// DefaultConfig returns the embedded defaults.
func DefaultConfig() Config {
	var c Config
	if err := yaml.UnmarshalStrict(defaultsYAML, &c); err != nil {
		// The embedded document is tested; this cannot happen in a release.
		panic(fmt.Sprintf("meshlet: embedded injection defaults: %v", err))
	}
	return c
}

// LoadConfig overlays the document data (YAML or JSON) on the defaults and
// validates the result. Unknown fields are errors; every problem is reported.
func LoadConfig(data []byte) (Config, error) {
	c := DefaultConfig()
	if err := yaml.UnmarshalStrict(data, &c); err != nil {
		// Report the field values' problems too, not only the first
		// unknown field or type error.
		errs := []error{fmt.Errorf("parsing injection config: %w", err)}
		lax := DefaultConfig()
		if yaml.Unmarshal(data, &lax) == nil {
			errs = append(errs, lax.Validate())
		}
		return Config{}, errors.Join(errs...)
	}
	if err := c.Validate(); err != nil {
		return Config{}, err
	}
	return c, nil
}

// Validate checks every field and returns all problems at once (errors.Join
// of *FieldError), or nil.
func (c *Config) Validate() error {
	var errs []error
	bad := func(field, value, problem string) {
		errs = append(errs, &FieldError{Field: field, Value: value, Problem: problem})
	}
	if c.APIVersion != APIVersion {
		bad("apiVersion", c.APIVersion, "must be "+APIVersion)
	}
	if c.Kind != Kind {
		bad("kind", c.Kind, "must be "+Kind)
	}
	if err := checkImage(c.Image); err != "" {
		bad("image", c.Image, err)
	}
	switch c.ImagePullPolicy {
	case corev1.PullAlways, corev1.PullIfNotPresent, corev1.PullNever:
	default:
		bad("imagePullPolicy", string(c.ImagePullPolicy), "must be Always, IfNotPresent or Never")
	}
	if msgs := validation.IsDNS1123Label(c.WebhookNamespace); len(msgs) > 0 {
		bad("webhookNamespace", c.WebhookNamespace, strings.Join(msgs, "; "))
	}
	if c.Revision == "" || strings.ContainsAny(c.Revision, " \t\n\"") {
		bad("revision", c.Revision, "must be a non-empty word")
	}
	switch c.NativeSidecar {
	case NativeSidecarAuto, NativeSidecarTrue, NativeSidecarFalse:
	default:
		bad("nativeSidecar", string(c.NativeSidecar), "must be auto, true or false")
	}
	if _, err := parseDrain(c.TerminationDrainDuration); err != nil {
		bad("terminationDrainDuration", c.TerminationDrainDuration, err.Error())
	}
	if c.ProxyUID < 0 || c.ProxyUID > 1<<31-1 {
		bad("proxyUID", fmt.Sprint(c.ProxyUID), "must be between 0 and 2147483647")
	}
	if c.ProxyGID < 0 || c.ProxyGID > 1<<31-1 {
		bad("proxyGID", fmt.Sprint(c.ProxyGID), "must be between 0 and 2147483647")
	}
	q := map[string]*resource.Quantity{}
	for _, f := range []struct{ name, value string }{
		{"resources.requests.cpu", c.Resources.Requests.CPU},
		{"resources.requests.memory", c.Resources.Requests.Memory},
		{"resources.limits.cpu", c.Resources.Limits.CPU},
		{"resources.limits.memory", c.Resources.Limits.Memory},
	} {
		if f.value == "" {
			continue
		}
		v, err := parseQuantity(f.value)
		if err != nil {
			bad(f.name, f.value, err.Error())
			continue
		}
		q[f.name] = &v
	}
	for _, r := range []string{"cpu", "memory"} {
		req, lim := q["resources.requests."+r], q["resources.limits."+r]
		if req != nil && lim != nil && req.Cmp(*lim) > 0 {
			bad("resources.requests."+r, req.String(), "exceeds resources.limits."+r+" "+lim.String())
		}
	}
	for _, f := range []struct{ name, value string }{
		{"discoveryAddress", c.DiscoveryAddress},
		{"caAddress", c.CAAddress},
	} {
		if f.value == "" {
			continue
		}
		if err := checkHostPort(f.value); err != nil {
			bad(f.name, f.value, err.Error())
		}
	}
	errs = append(errs, c.validateTemplates()...)
	cp := c.Capture
	for _, f := range []struct {
		name, value string
		parse       func(string) (string, error)
	}{
		{"capture.interceptionMode", cp.InterceptionMode, parseStrictMode},
		{"capture.includeInboundPorts", cp.IncludeInboundPorts, parsePortsOrStar},
		{"capture.excludeInboundPorts", cp.ExcludeInboundPorts, parsePorts},
		{"capture.includeOutboundIPRanges", cp.IncludeOutboundIPRanges, parseCIDRsOrStar},
		{"capture.excludeOutboundIPRanges", cp.ExcludeOutboundIPRanges, parseCIDRs},
		{"capture.includeOutboundPorts", cp.IncludeOutboundPorts, parsePorts},
		{"capture.excludeOutboundPorts", cp.ExcludeOutboundPorts, parsePorts},
		{"capture.excludeInterfaces", cp.ExcludeInterfaces, parseInterfaces},
	} {
		if _, err := f.parse(f.value); err != nil {
			bad(f.name, f.value, err.Error())
		}
	}
	return errors.Join(errs...)
}

// errTProxy rejects Istio's TPROXY interception mode up front: meshlet's
// capture (`meshlet init`, the CNI plugin) and proxy implement REDIRECT only,
// so a TPROXY pod would be admitted only to fail in istio-init.
var errTProxy = fmt.Errorf("%s is not supported by meshlet yet (capture and proxy implement %s); use %s", ModeTProxy, ModeRedirect, ModeRedirect)

func parseStrictMode(s string) (string, error) {
	switch s {
	case ModeRedirect, ModeNone:
		return s, nil
	case ModeTProxy:
		return "", errTProxy
	}
	return "", fmt.Errorf("must be %s or %s (%s is not supported yet)", ModeRedirect, ModeNone, ModeTProxy)
}

func parseDrain(s string) (time.Duration, error) {
	d, err := time.ParseDuration(strings.TrimSpace(s))
	if err != nil {
		return 0, fmt.Errorf("not a duration (e.g. 5s, 1m30s)")
	}
	if d <= 0 {
		return 0, fmt.Errorf("must be positive (the agent's --drain-duration)")
	}
	return d, nil
}

func parseQuantity(s string) (resource.Quantity, error) {
	q, err := resource.ParseQuantity(strings.TrimSpace(s))
	if err != nil {
		return q, fmt.Errorf("not a quantity (e.g. 100m, 128Mi)")
	}
	if q.Sign() < 0 {
		return q, fmt.Errorf("must not be negative")
	}
	return q, nil
}

func checkImage(s string) string {
	if s == "" {
		return "must not be empty"
	}
	if strings.ContainsAny(s, " \t\r\n") {
		return "must not contain white space"
	}
	return ""
}
