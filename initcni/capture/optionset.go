package capture

import (
	"strings"
)

// Pod annotations (Istio's names) that set capture options per pod, and the
// injector's status annotation, which marks a pod whose traffic is captured.
const (
	AnnotationInterceptionMode        = "sidecar.istio.io/interceptionMode"
	AnnotationIncludeInboundPorts     = "traffic.sidecar.istio.io/includeInboundPorts"
	AnnotationExcludeInboundPorts     = "traffic.sidecar.istio.io/excludeInboundPorts"
	AnnotationIncludeOutboundIPRanges = "traffic.sidecar.istio.io/includeOutboundIPRanges"
	AnnotationExcludeOutboundIPRanges = "traffic.sidecar.istio.io/excludeOutboundIPRanges"
	AnnotationIncludeOutboundPorts    = "traffic.sidecar.istio.io/includeOutboundPorts"
	AnnotationExcludeOutboundPorts    = "traffic.sidecar.istio.io/excludeOutboundPorts"
	AnnotationExcludeInterfaces       = "traffic.sidecar.istio.io/excludeInterfaces"

	// AnnotationStatus is written by the injector (JSON: what it added).
	// The CNI plugin captures exactly the pods that carry it.
	AnnotationStatus = "sidecar.istio.io/status"
)

// Option is one capture option and every name it goes by. The option set
// (OptionSet) is the single definition `meshlet init`'s flags and env vars,
// the CNI plugin's config keys, the injector's config keys and the pod
// annotations are all derived from, so they cannot disagree.
type Option struct {
	// Field is the Options field the option sets (and the name BuildConfig
	// hands to a Namer).
	Field string
	// Short is istio-iptables' one-letter flag, "" when there is none.
	Short string
	// Long is `meshlet init`'s long flag.
	Long string
	// Env is `meshlet init`'s environment variable (a flag wins over it).
	Env string
	// Key is the JSON key in the CNI plugin config's "capture" object and in
	// the injection config's "capture" section.
	Key string
	// Annotation is the pod annotation that overrides the option, "" when a
	// pod cannot set it.
	Annotation string
	// AnnotationAdds: the annotation's list is added to the configured list
	// instead of replacing it (Istio's excludeInboundPorts).
	AnnotationAdds bool
	// Usage is the flag's help text.
	Usage string

	field func(*Options) *string
}

// Ptr returns the field of o the option sets.
func (opt Option) Ptr(o *Options) *string { return opt.field(o) }

// Get returns the option's value in o.
func (opt Option) Get(o Options) string { return *opt.field(&o) }

// Flag names the option as `meshlet init` does in messages: "--long (-s)".
func (opt Option) Flag() string {
	if opt.Short == "" {
		return "--" + opt.Long
	}
	return "--" + opt.Long + " (-" + opt.Short + ")"
}

// OptionSet lists every capture option, in the order the injector passes
// them to `meshlet init` (istio-iptables' order).
var OptionSet = []Option{
	{Field: "ProxyPort", Short: "p", Long: "proxy-port", Env: "MESHLET_PROXY_PORT", Key: "proxyPort",
		Usage: "port the proxy captures outbound traffic on",
		field: func(o *Options) *string { return &o.ProxyPort }},
	{Field: "InboundCapturePort", Short: "z", Long: "inbound-capture-port", Env: "MESHLET_INBOUND_CAPTURE_PORT", Key: "inboundCapturePort",
		Usage: "port the proxy captures inbound traffic on",
		field: func(o *Options) *string { return &o.InboundCapturePort }},
	{Field: "ProxyUID", Short: "u", Long: "proxy-uid", Env: "MESHLET_PROXY_UID", Key: "proxyUID",
		Usage: "UID(s) of the proxy, never captured (comma list)",
		field: func(o *Options) *string { return &o.ProxyUID }},
	{Field: "ProxyGID", Short: "g", Long: "proxy-gid", Env: "MESHLET_PROXY_GID", Key: "proxyGID",
		Usage: "GID(s) of the proxy, never captured (comma list)",
		field: func(o *Options) *string { return &o.ProxyGID }},
	{Field: "InterceptionMode", Short: "m", Long: "interception-mode", Env: "MESHLET_INTERCEPTION_MODE", Key: "interceptionMode",
		Annotation: AnnotationInterceptionMode,
		Usage:      "inbound interception mode: REDIRECT (TPROXY is not yet supported)",
		field:      func(o *Options) *string { return &o.InterceptionMode }},
	{Field: "OutboundIPRanges", Short: "i", Long: "outbound-ip-ranges", Env: "MESHLET_OUTBOUND_IP_RANGES", Key: "includeOutboundIPRanges",
		Annotation: AnnotationIncludeOutboundIPRanges,
		Usage:      `outbound IP ranges to capture: "*" all, "" none, or a CIDR list`,
		field:      func(o *Options) *string { return &o.OutboundIPRanges }},
	{Field: "OutboundIPRangesExclude", Short: "x", Long: "outbound-ip-ranges-exclude", Env: "MESHLET_OUTBOUND_IP_RANGES_EXCLUDE", Key: "excludeOutboundIPRanges",
		Annotation: AnnotationExcludeOutboundIPRanges,
		Usage:      "outbound IP ranges never captured (CIDR list; wins over -i and -q)",
		field:      func(o *Options) *string { return &o.OutboundIPRangesExclude }},
	{Field: "InboundPorts", Short: "b", Long: "inbound-ports", Env: "MESHLET_INBOUND_PORTS", Key: "includeInboundPorts",
		Annotation: AnnotationIncludeInboundPorts,
		Usage:      `inbound ports to capture: "*" all, "" none, or a comma list`,
		field:      func(o *Options) *string { return &o.InboundPorts }},
	{Field: "InboundPortsExclude", Short: "d", Long: "inbound-ports-exclude", Env: "MESHLET_INBOUND_PORTS_EXCLUDE", Key: "excludeInboundPorts",
		Annotation: AnnotationExcludeInboundPorts, AnnotationAdds: true,
		Usage: "inbound ports never captured (comma list; wins over -b; 15008 always added)",
		field: func(o *Options) *string { return &o.InboundPortsExclude }},
	{Field: "OutboundPorts", Short: "q", Long: "outbound-ports", Env: "MESHLET_OUTBOUND_PORTS", Key: "includeOutboundPorts",
		Annotation: AnnotationIncludeOutboundPorts,
		Usage:      "outbound ports captured whatever -i says (comma list; -x and -o still win)",
		field:      func(o *Options) *string { return &o.OutboundPorts }},
	{Field: "OutboundPortsExclude", Short: "o", Long: "outbound-ports-exclude", Env: "MESHLET_OUTBOUND_PORTS_EXCLUDE", Key: "excludeOutboundPorts",
		Annotation: AnnotationExcludeOutboundPorts,
		Usage:      "outbound ports never captured (comma list)",
		field:      func(o *Options) *string { return &o.OutboundPortsExclude }},
	{Field: "ExcludeInterfaces", Short: "c", Long: "exclude-interfaces", Env: "MESHLET_EXCLUDE_INTERFACES", Key: "excludeInterfaces",
		Annotation: AnnotationExcludeInterfaces,
		Usage:      "interfaces whose traffic is never captured (comma list; not lo)",
		field:      func(o *Options) *string { return &o.ExcludeInterfaces }},
	{Field: "IPv6", Long: "ipv6", Env: "MESHLET_IPV6", Key: "ipv6",
		Usage: "IPv6 rules: auto (when the pod has a global IPv6 address), on, off",
		field: func(o *Options) *string { return &o.IPv6 }},
}

// OptionByField returns the option that sets the Options field.
func OptionByField(field string) (Option, bool) {
	for _, opt := range OptionSet {
		if opt.Field == field {
			return opt, true
		}
	}
	return Option{}, false
}

// Args renders o as `meshlet init` arguments: every option with a short
// flag, explicitly (istio-iptables style, so the pod spec shows the whole
// capture), and --ipv6 when it is not auto.
func (o Options) Args() []string {
	args := make([]string, 0, 2*len(OptionSet))
	for _, opt := range OptionSet {
		v := opt.Get(o)
		if opt.Short == "" {
			if strings.TrimSpace(v) != "" && !strings.EqualFold(strings.TrimSpace(v), string(IPv6Auto)) {
				args = append(args, "--"+opt.Long, v)
			}
			continue
		}
		args = append(args, "-"+opt.Short, v)
	}
	return args
}

// ApplyAnnotations overrides o with the capture annotations present in
// annotations (the injector and the CNI plugin read them alike) and returns,
// for every field an annotation touched, that annotation's name.
func ApplyAnnotations(o *Options, annotations map[string]string) map[string]string {
	from := map[string]string{}
	for _, opt := range OptionSet {
		if opt.Annotation == "" {
			continue
		}
		v, ok := annotations[opt.Annotation]
		if !ok {
			continue
		}
		p := opt.Ptr(o)
		switch {
		case !opt.AnnotationAdds || strings.TrimSpace(*p) == "":
			*p = v
		case strings.TrimSpace(v) != "":
			*p += "," + v
		}
		from[opt.Field] = opt.Annotation
	}
	return from
}
