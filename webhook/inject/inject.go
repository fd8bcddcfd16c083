package inject

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"sigs.k8s.io/yaml"

	"github.com/meshlet/meshlet/internal/meshports"
)

// Namespace is what injection needs to know about the pod's namespace.
type Namespace struct {
	Name        string
	Labels      map[string]string
	Annotations map[string]string
}

// Options tell Inject how it is called.
type Options struct {
	// RequireOptIn is the webhook's rule: inject only pods whose namespace
	// has istio-injection=enabled (unless the pod opts out), or, in a
	// namespace without that label, pods that opt in with
	// sidecar.istio.io/inject=true. When false (`meshlet inject`, like
	// istioctl kube-inject) every pod is injected unless it opts out.
	RequireOptIn bool
	// AutoNativeSidecar is what nativeSidecar: auto resolves to: the webhook
	// sets it when the API server is at least 1.29, the CLI sets it unless
	// told otherwise.
	AutoNativeSidecar bool
}

// Reason says why a pod was or was not injected.
type Reason string

// The reasons of a Decision.
const (
	ReasonInjected              Reason = "Injected"
	ReasonAlreadyInjected       Reason = "AlreadyInjected"
	ReasonHostNetwork           Reason = "HostNetwork"
	ReasonSystemNamespace       Reason = "SystemNamespace"
	ReasonOptOut                Reason = "OptOut"
	ReasonNamespaceDisabled     Reason = "NamespaceDisabled"
	ReasonNamespaceNotEnabled   Reason = "NamespaceNotEnabled"
	ReasonInvalidAnnotations    Reason = "InvalidAnnotations"
	ReasonInvalidInjectionValue Reason = "InvalidInjectionValue"
)

// Decision is the outcome of Inject: whether the returned pod carries the
// sidecar, why, and warnings for the user (the webhook returns them as
// admission warnings, the CLI logs them).
type Decision struct {
	Injected bool
	Reason   Reason
	Message  string
	Warnings []string
}

// AnnotationError is one invalid pod annotation (or label).
type AnnotationError struct {
	Key     string
	Value   string
	Problem string
}

func (e *AnnotationError) Error() string {
	return fmt.Sprintf("annotation %s=%q: %s", e.Key, e.Value, e.Problem)
}

// Inject returns a copy of pod with the sidecar injected, or an unchanged
// copy and the reason it was skipped. pod is never modified. The error lists
// every invalid annotation (errors.Join of *AnnotationError); the pod must
// then be rejected, and Decision.Reason is ReasonInvalidAnnotations.
func Inject(pod *corev1.Pod, ns Namespace, cfg *Config, opts Options) (*corev1.Pod, Decision, error) {
	if pod == nil {
		return nil, Decision{}, errors.New("inject: nil pod")
	}
	if cfg == nil {
		return nil, Decision{}, errors.New("inject: nil config")
	}
	out := pod.DeepCopy()
	d, err := decide(pod, ns, cfg, opts)
	if err != nil || !d.Injected {
		return out, d, err
	}
	p, warnings, err := resolve(pod, cfg, opts)
	d.Warnings = append(d.Warnings, warnings...)
	if err != nil {
		d.Injected, d.Reason, d.Message = false, ReasonInvalidAnnotations, "invalid annotations: "+strings.ReplaceAll(err.Error(), "\n", "; ")
		return out, d, err
	}
	warnings, err = apply(out, cfg, p)
	d.Warnings = append(d.Warnings, warnings...)
	if err != nil {
		d.Injected, d.Reason, d.Message = false, ReasonInvalidAnnotations, err.Error()
		return pod.DeepCopy(), d, err
	}
	d.Message = injectedMessage(cfg, &p)
	return out, d, nil
}

// injectedMessage says what was injected.
func injectedMessage(cfg *Config, p *params) string {
	if p.plan.isDefaultSidecar() && p.captureOn {
		return fmt.Sprintf("injected (%s layout, %s capture)", layoutName(p.native), captureName(cfg.CNI.Enabled, p.capture.mode))
	}
	var parts []string
	switch p.plan.proxy {
	case ProxySidecar:
		parts = append(parts, "istio-proxy as a "+strings.TrimSuffix(layoutName(p.native), " sidecar")+" sidecar")
	case ProxyGateway:
		parts = append(parts, "istio-proxy as a gateway")
	}
	switch {
	case p.captureOn:
		parts = append(parts, captureName(cfg.CNI.Enabled, p.capture.mode)+" capture")
	case p.plan.capture:
		parts = append(parts, "no capture (interception mode "+p.capture.mode+")")
	default:
		parts = append(parts, "no capture")
	}
	if p.plan.grpc {
		parts = append(parts, "proxyless gRPC bootstrap")
	}
	return fmt.Sprintf("injected (templates %s: %s)", strings.Join(p.plan.names, ","), strings.Join(parts, ", "))
}

func layoutName(native bool) string {
	if native {
		return "native sidecar"
	}
	return "classic"
}

func captureName(cni bool, mode string) string {
	if cni {
		return "CNI " + mode
	}
	return "istio-init " + mode
}

// parseBool accepts true/false and, with a correction warning, the other
// spellings Istio's parser takes.
func parseBool(s string) (v bool, corrected bool, ok bool) {
	switch s {
	case "true":
		return true, false, true
	case "false":
		return false, false, true
	}
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "true", "yes", "y", "on", "1", "enabled":
		return true, true, true
	case "false", "no", "n", "off", "0", "disabled":
		return false, true, true
	}
	return false, false, false
}

// decide applies the triggers and the never-inject rules.
func decide(pod *corev1.Pod, ns Namespace, cfg *Config, opts Options) (Decision, error) {
	var d Decision
	skip := func(r Reason, msg string) (Decision, error) {
		d.Reason, d.Message = r, msg
		return d, nil
	}
	if _, ok := pod.Annotations[AnnotationStatus]; ok {
		return skip(ReasonAlreadyInjected, "already injected ("+AnnotationStatus+" is present)")
	}

	// The pod's own wish: the label, else the deprecated annotation.
	var want *bool
	label, hasLabel := pod.Labels[LabelInject]
	ann, hasAnn := pod.Annotations[AnnotationInject]
	switch {
	case hasLabel:
		v, corrected, ok := parseBool(label)
		if !ok {
			d.Reason = ReasonInvalidInjectionValue
			d.Message = fmt.Sprintf("label %s=%q is not true or false", LabelInject, label)
			return d, &AnnotationError{Key: "label " + LabelInject, Value: label, Problem: "must be true or false"}
		}
		if corrected {
			d.Warnings = append(d.Warnings, fmt.Sprintf("label %s=%q read as %q; write %q", LabelInject, label, strconv.FormatBool(v), strconv.FormatBool(v)))
		}
		want = &v
		if hasAnn {
			d.Warnings = append(d.Warnings, fmt.Sprintf("annotation %s=%q is ignored: the label of the same name (%q) wins", AnnotationInject, ann, label))
		}
	case hasAnn:
		v, _, ok := parseBool(ann)
		if !ok {
			d.Reason = ReasonInvalidInjectionValue
			d.Message = fmt.Sprintf("annotation %s=%q is not true or false", AnnotationInject, ann)
			return d, &AnnotationError{Key: AnnotationInject, Value: ann, Problem: "must be true or false"}
		}
		want = &v
		d.Warnings = append(d.Warnings, fmt.Sprintf("annotation %s=%q is deprecated: use the pod label %s=%q", AnnotationInject, ann, LabelInject, strconv.FormatBool(v)))
	}
	optedIn := want != nil && *want
	skipOptedIn := func(r Reason, msg string) (Decision, error) {
		if optedIn {
			d.Warnings = append(d.Warnings, "the pod asks for injection ("+LabelInject+"=true) but is not injected: "+msg)
		}
		return skip(r, msg)
	}

	if pod.Spec.HostNetwork {
		return skipOptedIn(ReasonHostNetwork, "pod uses the host network (hostNetwork: true)")
	}
	nsName := ns.Name
	if nsName == "" {
		nsName = pod.Namespace
	}
	switch nsName {
	case "kube-system", "kube-public", cfg.WebhookNamespace:
		return skipOptedIn(ReasonSystemNamespace, fmt.Sprintf("namespace %s is never injected", nsName))
	}
	if want != nil && !*want {
		return skip(ReasonOptOut, "pod opts out ("+LabelInject+"=false)")
	}
	if opts.RequireOptIn {
		switch nsLabel, has := ns.Labels[LabelNamespaceInjection]; {
		case has && nsLabel == "enabled":
		case has && nsLabel == "disabled":
			return skipOptedIn(ReasonNamespaceDisabled, fmt.Sprintf("namespace %s has %s=disabled", nsName, LabelNamespaceInjection))
		case optedIn:
		default:
			return skip(ReasonNamespaceNotEnabled, fmt.Sprintf("namespace %s is not labelled %s=enabled and the pod does not opt in", nsName, LabelNamespaceInjection))
		}
	}
	d.Injected, d.Reason = true, ReasonInjected
	return d, nil
}

// params are the resolved per-pod settings.
type params struct {
	image  string
	native bool
	// discovery is the xDS address istio-proxy and the gRPC bootstrap
	// use (the config's discoveryAddress or the pod's proxy.istio.io/config
	// discoveryAddress); empty: the static configuration.
	discovery string
	// discoveryOwn: the pod named its discovery address itself
	// (proxy.istio.io/config discoveryAddress).
	discoveryOwn bool
	hold         bool
	drain        time.Duration
	resources    corev1.ResourceRequirements
	capture      captureSettings
	// plan is what the pod's templates inject.
	plan                    plan
	templatesFromAnnotation bool
	// captureOn: capture rules are installed (by istio-init or the CNI
	// plugin) and the proxy serves its capture listeners.
	captureOn bool
}

// knownProxyConfig are the proxy.istio.io/config fields meshlet reads.
var knownProxyConfig = []string{"discoveryAddress", "holdApplicationUntilProxyStarts", "terminationDrainDuration"}

// resolve merges config and annotations, collecting every invalid
// annotation.
func resolve(pod *corev1.Pod, cfg *Config, opts Options) (params, []string, error) {
	var (
		p        params
		errs     []error
		warnings []string
	)
	ann := pod.Annotations
	bad := func(key, problem string) {
		errs = append(errs, &AnnotationError{Key: key, Value: ann[key], Problem: problem})
	}
	// Config values are validated by Config.Validate; an unvalidated config
	// still yields errors, not panics.
	cfgBad := func(field, value string, err error) {
		errs = append(errs, &FieldError{Field: field, Value: value, Problem: err.Error()})
	}

	p.image = cfg.Image
	if v, ok := ann[AnnotationProxyImage]; ok {
		if msg := checkImage(v); msg != "" {
			bad(AnnotationProxyImage, msg)
		} else {
			p.image = v
		}
	}

	switch cfg.NativeSidecar {
	case NativeSidecarTrue:
		p.native = true
	case NativeSidecarFalse:
		p.native = false
	default:
		p.native = opts.AutoNativeSidecar
	}
	if v, ok := ann[AnnotationNativeSidecar]; ok {
		b, corrected, ok := parseBool(v)
		switch {
		case !ok:
			bad(AnnotationNativeSidecar, "must be true or false")
		default:
			if corrected {
				warnings = append(warnings, fmt.Sprintf("annotation %s=%q read as %q", AnnotationNativeSidecar, v, strconv.FormatBool(b)))
			}
			p.native = b
		}
	}

	p.hold = cfg.HoldApplicationUntilProxyStarts
	p.discovery = cfg.DiscoveryAddress
	var err error
	if p.drain, err = parseDrain(cfg.TerminationDrainDuration); err != nil {
		cfgBad("terminationDrainDuration", cfg.TerminationDrainDuration, err)
	}
	if v, ok := ann[AnnotationProxyConfig]; ok {
		var pc map[string]any
		if err := yaml.Unmarshal([]byte(v), &pc); err != nil {
			bad(AnnotationProxyConfig, "not a YAML or JSON object")
		} else {
			var ignored []string
			for k, val := range pc {
				switch k {
				case "holdApplicationUntilProxyStarts":
					b, ok := val.(bool)
					if !ok {
						if s, isStr := val.(string); isStr {
							var corrected bool
							b, corrected, ok = parseBool(s)
							if ok && corrected {
								warnings = append(warnings, fmt.Sprintf("annotation %s: holdApplicationUntilProxyStarts %q read as %v", AnnotationProxyConfig, s, b))
							}
						}
					}
					if !ok {
						bad(AnnotationProxyConfig, fmt.Sprintf("holdApplicationUntilProxyStarts %v is not true or false", val))
					} else {
						p.hold = b
					}
				case "discoveryAddress":
					s, ok := val.(string)
					var err error
					if ok {
						err = checkHostPort(s)
					}
					if !ok || err != nil {
						bad(AnnotationProxyConfig, fmt.Sprintf("discoveryAddress %v is not host:port (e.g. istiod.meshlet-system.svc:15010)", val))
					} else {
						p.discovery, p.discoveryOwn = s, true
					}
				case "terminationDrainDuration":
					s, ok := val.(string)
					var d time.Duration
					var err error
					if ok {
						d, err = parseDrain(s)
					}
					if !ok || err != nil {
						bad(AnnotationProxyConfig, fmt.Sprintf("terminationDrainDuration %v is not a duration (e.g. 5s)", val))
					} else {
						p.drain = d
					}
				default:
					ignored = append(ignored, k)
				}
			}
			if len(ignored) > 0 {
				sort.Strings(ignored)
				warnings = append(warnings, fmt.Sprintf("annotation %s: fields %s are ignored (meshlet reads %s)", AnnotationProxyConfig, strings.Join(ignored, ", "), strings.Join(knownProxyConfig, ", ")))
			}
		}
	}
	if p.native && p.hold {
		// The native layout always holds the app: nothing to do.
		p.hold = false
	}
	if !p.native && (pod.Spec.RestartPolicy == corev1.RestartPolicyNever || pod.Spec.RestartPolicy == corev1.RestartPolicyOnFailure) {
		warnings = append(warnings, fmt.Sprintf("classic sidecar layout with restartPolicy %s: istio-proxy keeps running after the app exits, so the pod never completes unless the app calls POST http://localhost:%d/quitquitquit (the native layout has no such problem)", pod.Spec.RestartPolicy, StatusPort))
	}
	for _, cs := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, c := range cs {
			for _, port := range c.Ports {
				if slices.Contains(meshports.Sidecar, port.ContainerPort) {
					warnings = append(warnings, fmt.Sprintf("container %s declares port %d, which the sidecar uses: the app cannot listen on it", c.Name, port.ContainerPort))
				}
			}
		}
	}

	// Resources: config, then annotations.
	type res struct {
		cfgField, cfgValue, ann string
		name                    corev1.ResourceName
		limit                   bool
	}
	var (
		requests = corev1.ResourceList{}
		limits   = corev1.ResourceList{}
		fromAnn  = map[string]string{} // "requests.cpu" → annotation key
	)
	for _, r := range []res{
		{"resources.requests.cpu", cfg.Resources.Requests.CPU, AnnotationProxyCPU, corev1.ResourceCPU, false},
		{"resources.requests.memory", cfg.Resources.Requests.Memory, AnnotationProxyMemory, corev1.ResourceMemory, false},
		{"resources.limits.cpu", cfg.Resources.Limits.CPU, AnnotationProxyCPULimit, corev1.ResourceCPU, true},
		{"resources.limits.memory", cfg.Resources.Limits.Memory, AnnotationProxyMemoryLimit, corev1.ResourceMemory, true},
	} {
		list := requests
		kind := "requests."
		if r.limit {
			list, kind = limits, "limits."
		}
		if v, ok := ann[r.ann]; ok {
			q, err := parseQuantity(v)
			if err != nil {
				bad(r.ann, err.Error())
				continue
			}
			list[r.name] = q
			fromAnn[kind+string(r.name)] = r.ann
			continue
		}
		if r.cfgValue == "" {
			continue
		}
		q, err := parseQuantity(r.cfgValue)
		if err != nil {
			cfgBad(r.cfgField, r.cfgValue, err)
			continue
		}
		list[r.name] = q
	}
	for _, name := range []corev1.ResourceName{corev1.ResourceCPU, corev1.ResourceMemory} {
		req, hasReq := requests[name]
		lim, hasLim := limits[name]
		if !hasReq || !hasLim || req.Cmp(lim) <= 0 {
			continue
		}
		reqAnn, limAnn := fromAnn["requests."+string(name)], fromAnn["limits."+string(name)]
		switch {
		case limAnn != "":
			bad(limAnn, fmt.Sprintf("limit %s is below the %s request %s", lim.String(), name, req.String()))
		case reqAnn != "":
			warnings = append(warnings, fmt.Sprintf("annotation %s=%q exceeds the configured %s limit %s: the limit is raised to %s", reqAnn, ann[reqAnn], name, lim.String(), req.String()))
			limits[name] = req.DeepCopy()
		default:
			cfgBad("resources.requests."+string(name), req.String(), errors.New("exceeds the limit"))
		}
	}
	if len(requests) > 0 {
		p.resources.Requests = requests
	}
	if len(limits) > 0 {
		p.resources.Limits = limits
	}

	// Capture: initcni/capture's builder decides, as for `meshlet init`.
	var capErrs []error
	var capWarnings []string
	p.capture, capWarnings, capErrs = resolveCapture(ann, cfg)
	errs = append(errs, capErrs...)
	warnings = append(warnings, capWarnings...)

	// Templates.
	if p.plan, err = selectTemplates(ann, cfg); err != nil {
		errs = append(errs, err)
	}
	_, p.templatesFromAnnotation = ann[AnnotationTemplates]
	if p.plan.grpc && p.discovery == "" {
		errs = append(errs, &FieldError{Field: "discoveryAddress", Value: "",
			Problem: fmt.Sprintf("is empty, but templates %s write the proxyless gRPC bootstrap, which needs it", strings.Join(p.plan.names, ","))})
	}
	p.captureOn = p.plan.capture && p.capture.mode != ModeNone

	if len(errs) > 0 {
		sort.SliceStable(errs, func(i, j int) bool { return errKey(errs[i]) < errKey(errs[j]) })
		return p, warnings, errors.Join(errs...)
	}
	sort.Strings(warnings)
	return p, warnings, nil
}

func errKey(err error) string {
	var ae *AnnotationError
	if errors.As(err, &ae) {
		return "b" + ae.Key
	}
	return "a" + err.Error()
}

// apply mutates pod (a copy) into its injected form.
func apply(pod *corev1.Pod, cfg *Config, p params) ([]string, error) {
	var warnings []string
	pl := &p.plan
	st := Status{
		Revision:    cfg.Revision,
		Annotations: map[string]*string{},
	}
	if p.templatesFromAnnotation {
		st.Templates = pl.names
	}
	setAnn := func(k, v string) {
		if old, ok := pod.Annotations[k]; ok && old == v {
			return
		}
		if _, recorded := st.Annotations[k]; !recorded {
			if old, ok := pod.Annotations[k]; ok {
				st.Annotations[k] = &old
			} else {
				st.Annotations[k] = nil
			}
		}
		if pod.Annotations == nil {
			pod.Annotations = map[string]string{}
		}
		pod.Annotations[k] = v
	}

	// What the templates inject, by name: the pod's own containers of
	// these names are merged over the injected ones.
	var injected []string
	if p.captureOn {
		injected = append(injected, initName(cfg))
	}
	if pl.proxy != ProxyNone {
		injected = append(injected, ContainerProxy)
	}
	if pl.grpc {
		injected = append(injected, ContainerGRPCBootstrap)
	}
	for _, c := range slices.Concat(pl.initContainers, pl.containers) {
		if !slices.Contains(injected, c.Name) {
			injected = append(injected, c.Name)
		}
	}
	own, gatewayAt, err := takeOverrides(pod, injected, &st)
	if err != nil {
		return nil, err
	}
	for _, cs := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, c := range cs {
			switch c.Name {
			case ContainerInit, ContainerValidation, ContainerProxy, ContainerGRPCBootstrap:
				warnings = append(warnings, fmt.Sprintf("container %s is kept as the pod's own: nothing of that name is injected (templates %s, interception mode %s)", c.Name, strings.Join(pl.names, ","), p.capture.mode))
			}
		}
	}
	var volumes []corev1.Volume
	if p.captureOn || pl.proxy != ProxyNone {
		volumes = append(volumes, corev1.Volume{
			Name:         VolumeRuntime,
			VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory}},
		})
	}
	if pl.proxy != ProxyNone {
		volumes = append(volumes, identityVolumes(cfg.CAAddress == "")...)
		setServiceAccount(pod, &st)
	}
	if pl.proxy == ProxySidecar && cfg.CAAddress != "" {
		// Before istio-proxy is built: its ISTIO_METAJSON_LABELS include it.
		// Only a sidecar that gets a workload certificate (a CA address is
		// configured) accepts mutual TLS: without one, clients' automatic
		// mutual TLS must reach the pod in plain text.
		setLabel(pod, &st, LabelTLSMode, TLSModeIstio)
	}
	if pl.grpc {
		volumes = append(volumes, corev1.Volume{
			Name:         VolumeGRPC,
			VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{Medium: corev1.StorageMediumMemory}},
		})
	}
	volumes = append(volumes, pl.volumes...)
	for _, v := range volumes {
		if slices.ContainsFunc(pod.Spec.Volumes, func(o corev1.Volume) bool { return o.Name == v.Name }) {
			return nil, &AnnotationError{Key: "volume " + v.Name, Value: v.Name, Problem: "the pod already has a volume of this name"}
		}
		st.Volumes = append(st.Volumes, v.Name)
	}

	appNames := make([]string, 0, len(pod.Spec.Containers))
	for _, c := range pod.Spec.Containers {
		appNames = append(appNames, c.Name)
	}
	// merge applies the templates' and then the pod's own container of
	// c's name over c.
	merge := func(c corev1.Container, tmpl []corev1.Container) (corev1.Container, error) {
		for _, t := range tmpl {
			if t.Name == c.Name {
				var err error
				if c, err = mergeContainer(c, t); err != nil {
					return c, fmt.Errorf("template container %s: %w", t.Name, err)
				}
			}
		}
		if o, ok := own[c.Name]; ok {
			var err error
			if c, err = mergeContainer(c, o); err != nil {
				return c, &AnnotationError{Key: "container " + c.Name, Value: c.Name, Problem: "merging the pod's own container over the injected one: " + err.Error()}
			}
		}
		return c, nil
	}

	uid, gid := cfg.ProxyUID, cfg.ProxyGID
	var proxy *corev1.Container
	if pl.proxy != ProxyNone {
		c, err := merge(proxyContainer(cfg, p, appNames, pod.Labels), slices.Concat(pl.initContainers, pl.containers))
		if err != nil {
			return nil, err
		}
		// The capture rules exempt the proxy's identity: an overridden
		// runAsUser or runAsGroup is that identity.
		if sc := c.SecurityContext; sc != nil {
			if sc.RunAsUser != nil {
				uid = *sc.RunAsUser
			}
			if sc.RunAsGroup != nil {
				gid = *sc.RunAsGroup
			}
		}
		proxy = &c
	}
	var lead, extraInit []corev1.Container // lead: before the pod's init containers
	if p.captureOn {
		c, err := merge(initContainer(cfg, p, uid, gid), pl.initContainers)
		if err != nil {
			return nil, err
		}
		lead = append(lead, c)
	}
	native := p.native && pl.proxy == ProxySidecar
	if native {
		lead = append(lead, *proxy)
	}
	if pl.grpc {
		c, err := merge(grpcBootstrapContainer(cfg, p, uid, gid), pl.initContainers)
		if err != nil {
			return nil, err
		}
		extraInit = append(extraInit, c)
	}
	var extra []corev1.Container
	for _, t := range pl.initContainers {
		if !slices.ContainsFunc(slices.Concat(lead, extraInit), func(c corev1.Container) bool { return c.Name == t.Name }) && t.Name != ContainerProxy {
			c, err := merge(templateContainer(t, p.image), nil)
			if err != nil {
				return nil, err
			}
			extraInit = append(extraInit, c)
		}
	}
	for _, t := range pl.containers {
		if t.Name != ContainerProxy && !slices.ContainsFunc(slices.Concat(lead, extraInit, extra), func(c corev1.Container) bool { return c.Name == t.Name }) {
			c, err := merge(templateContainer(t, p.image), nil)
			if err != nil {
				return nil, err
			}
			extra = append(extra, c)
		}
	}

	// Layout.
	names := func(cs []corev1.Container) []string {
		n := make([]string, len(cs))
		for i, c := range cs {
			n[i] = c.Name
		}
		return n
	}
	if native {
		pod.Spec.InitContainers = slices.Concat(lead, extraInit, pod.Spec.InitContainers)
	} else {
		pod.Spec.InitContainers = slices.Concat(pod.Spec.InitContainers, lead, extraInit)
	}
	if len(lead)+len(extraInit) > 0 {
		st.InitContainers = names(slices.Concat(lead, extraInit))
	}
	switch {
	case proxy == nil || native:
	case pl.proxy == ProxyGateway && gatewayAt >= 0:
		pod.Spec.Containers = slices.Insert(pod.Spec.Containers, min(gatewayAt, len(pod.Spec.Containers)), *proxy)
		st.Containers = append(st.Containers, ContainerProxy)
	case p.hold && pl.proxy == ProxySidecar:
		pod.Spec.Containers = slices.Insert(pod.Spec.Containers, 0, *proxy)
		st.Containers = append(st.Containers, ContainerProxy)
	default:
		pod.Spec.Containers = append(pod.Spec.Containers, *proxy)
		st.Containers = append(st.Containers, ContainerProxy)
	}
	pod.Spec.Containers = append(pod.Spec.Containers, extra...)
	st.Containers = append(st.Containers, names(extra)...)
	pod.Spec.Volumes = append(pod.Spec.Volumes, volumes...)
	st.NativeSidecar = native
	if pl.grpc {
		addGRPCToApps(pod, appNames, &st)
	}

	if len(appNames) > 0 {
		if _, ok := pod.Annotations[AnnotationDefaultContainer]; !ok {
			setAnn(AnnotationDefaultContainer, appNames[0])
		}
		if _, ok := pod.Annotations[AnnotationDefaultLogsContainer]; !ok {
			setAnn(AnnotationDefaultLogsContainer, appNames[0])
		}
	}
	switch {
	case cfg.CNI.Enabled && p.captureOn:
		// The CNI plugin reads the effective capture settings from here.
		for _, kv := range p.capture.annotations() {
			setAnn(kv[0], kv[1])
		}
	case cfg.CNI.Enabled:
		// No capture for this pod: tell the CNI plugin so.
		setAnn(AnnotationInterceptionMode, ModeNone)
	}
	if len(st.Annotations) == 0 {
		st.Annotations = nil
	}
	b, err := json.Marshal(st)
	if err != nil {
		return nil, err
	}
	if pod.Annotations == nil {
		pod.Annotations = map[string]string{}
	}
	pod.Annotations[AnnotationStatus] = string(b)
	return warnings, nil
}

func initName(cfg *Config) string {
	if cfg.CNI.Enabled {
		return ContainerValidation
	}
	return ContainerInit
}

// templateContainer is a template's own (added) container; image auto is
// the injected image.
func templateContainer(c corev1.Container, image string) corev1.Container {
	c = *c.DeepCopy()
	if c.Image == "" || c.Image == ImageAuto {
		c.Image = image
	}
	return c
}

func ptr[T any](v T) *T { return &v }

func initContainer(cfg *Config, p params, uid, gid int64) corev1.Container {
	flags := p.capture.args(uid, gid)
	if cfg.CNI.Enabled {
		return corev1.Container{
			Name:            ContainerValidation,
			Image:           p.image,
			ImagePullPolicy: cfg.ImagePullPolicy,
			Command:         []string{Binary},
			Args:            append([]string{"init", "--validate"}, flags...),
			Resources:       *p.resources.DeepCopy(),
			SecurityContext: unprivileged(uid, gid),
		}
	}
	return corev1.Container{
		Name:            ContainerInit,
		Image:           p.image,
		ImagePullPolicy: cfg.ImagePullPolicy,
		Command:         []string{Binary},
		Args:            append([]string{"init"}, flags...),
		// iptables-legacy takes a lock file; the root file system is read-only.
		Env:          []corev1.EnvVar{{Name: "XTABLES_LOCKFILE", Value: RuntimeDir + "/xtables.lock"}},
		Resources:    *p.resources.DeepCopy(),
		VolumeMounts: []corev1.VolumeMount{{Name: VolumeRuntime, MountPath: RuntimeDir}},
		SecurityContext: &corev1.SecurityContext{
			RunAsUser:                ptr(int64(0)),
			RunAsGroup:               ptr(int64(0)),
			RunAsNonRoot:             ptr(false),
			Privileged:               ptr(false),
			AllowPrivilegeEscalation: ptr(false),
			ReadOnlyRootFilesystem:   ptr(true),
			Capabilities: &corev1.Capabilities{
				Add:  []corev1.Capability{"NET_ADMIN", "NET_RAW"},
				Drop: []corev1.Capability{"ALL"},
			},
		},
	}
}

func fieldEnv(name, path string) corev1.EnvVar {
	return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{APIVersion: "v1", FieldPath: path}}}
}

func resourceEnv(name, res string) corev1.EnvVar {
	return corev1.EnvVar{Name: name, ValueFrom: &corev1.EnvVarSource{ResourceFieldRef: &corev1.ResourceFieldSelector{ContainerName: ContainerProxy, Resource: res, Divisor: resource.MustParse("0")}}}
}

// proxyContainer is istio-proxy. Its environment is what the agent and
// its proxy generations read: the pod's identity from the downward API,
// the node metadata of the xDS client (ISTIO_META_*, the pod's labels as
// ISTIO_METAJSON_LABELS), and the control plane's addresses when set.
func proxyContainer(cfg *Config, p params, appNames []string, labels map[string]string) corev1.Container {
	ready := &corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{
		Path: "/healthz/ready", Port: intstrPort(HealthPort), Scheme: corev1.URISchemeHTTP,
	}}
	sc := unprivileged(cfg.ProxyUID, cfg.ProxyGID)
	c := corev1.Container{
		Name:            ContainerProxy,
		Image:           p.image,
		ImagePullPolicy: cfg.ImagePullPolicy,
		Command:         []string{Binary},
		Args:            agentArgs(cfg, p),
		Ports: []corev1.ContainerPort{
			{Name: "http-envoy-prom", ContainerPort: PrometheusPort, Protocol: corev1.ProtocolTCP},
		},
		Env: []corev1.EnvVar{
			fieldEnv("POD_NAME", "metadata.name"),
			fieldEnv("POD_NAMESPACE", "metadata.namespace"),
			fieldEnv("INSTANCE_IP", "status.podIP"),
			fieldEnv("SERVICE_ACCOUNT", "spec.serviceAccountName"),
			fieldEnv("HOST_IP", "status.hostIP"),
			{Name: "ISTIO_META_APP_CONTAINERS", Value: strings.Join(appNames, ",")},
			{Name: "ISTIO_META_INTERCEPTION_MODE", Value: p.interceptionMode()},
			{Name: EnvLabels, Value: labelsJSON(labels)},
			resourceEnv("GOMEMLIMIT", "limits.memory"),
			resourceEnv("GOMAXPROCS", "limits.cpu"),
		},
		Resources:      *p.resources.DeepCopy(),
		VolumeMounts:   append([]corev1.VolumeMount{{Name: VolumeRuntime, MountPath: RuntimeDir}}, identityMounts()...),
		ReadinessProbe: &corev1.Probe{ProbeHandler: *ready, InitialDelaySeconds: 1, PeriodSeconds: 2, TimeoutSeconds: 3, FailureThreshold: 30},
		// The agent drains on SIGTERM within the grace period.
		TerminationMessagePolicy: corev1.TerminationMessageFallbackToLogsOnError,
		SecurityContext:          sc,
	}
	if p.discovery != "" {
		c.Env = append(c.Env, corev1.EnvVar{Name: EnvDiscoveryAddress, Value: sidecarDiscovery(&p, cfg)})
	}
	if cfg.CAAddress != "" {
		c.Env = append(c.Env, corev1.EnvVar{Name: EnvCAAddress, Value: cfg.CAAddress})
	}
	if p.plan.proxy == ProxyGateway {
		return c
	}
	if p.native {
		c.RestartPolicy = ptr(corev1.ContainerRestartPolicyAlways)
		c.StartupProbe = &corev1.Probe{ProbeHandler: *ready.DeepCopy(), PeriodSeconds: 1, TimeoutSeconds: 3, FailureThreshold: 600}
		c.ReadinessProbe.InitialDelaySeconds, c.ReadinessProbe.PeriodSeconds, c.ReadinessProbe.FailureThreshold = 0, 15, 4
	}
	if p.hold {
		c.Lifecycle = &corev1.Lifecycle{PostStart: &corev1.LifecycleHandler{Exec: &corev1.ExecAction{Command: []string{Binary, "agent", "wait"}}}}
	}
	return c
}

// The environment of istio-proxy that points it at the control plane and
// describes the pod to it.
const (
	// EnvDiscoveryAddress is the xDS server (`meshlet proxy
	// --discovery-address`); unset: the static configuration.
	EnvDiscoveryAddress = "MESHLET_DISCOVERY_ADDRESS"
	// EnvCAAddress is the mesh CA the agent asks for the workload
	// certificate.
	EnvCAAddress = "MESHLET_CA_ADDRESS"
	// EnvLabels holds the pod's labels at admission as a JSON object
	// (Istio's ISTIO_METAJSON_LABELS), sent to the control plane as node
	// metadata LABELS. The control plane prefers the live Pod's labels.
	EnvLabels = "ISTIO_METAJSON_LABELS"
)

// labelsJSON is labels as a JSON object with sorted keys ({} when none).
func labelsJSON(labels map[string]string) string {
	if labels == nil {
		labels = map[string]string{}
	}
	b, _ := json.Marshal(labels) // a map of strings always marshals
	return string(b)
}

// agentArgs are istio-proxy's `meshlet agent` arguments: proxyArgs, plus
// the config's opt-in to lifecycle calls from outside the pod.
func agentArgs(cfg *Config, p params) []string {
	args := proxyArgs(p)
	if cfg.AllowRemoteLifecycle {
		args = append(args, "--allow-remote-lifecycle")
	}
	return args
}

// unprivileged is the security context of every container meshlet injects
// that needs no capability (istio-proxy, istio-validation, the gRPC bootstrap
// writer): the given non-root UID/GID, nothing added, everything dropped,
// read-only root, no privilege escalation.
func unprivileged(uid, gid int64) *corev1.SecurityContext {
	return &corev1.SecurityContext{
		RunAsUser:                ptr(uid),
		RunAsGroup:               ptr(gid),
		RunAsNonRoot:             ptr(true),
		Privileged:               ptr(false),
		AllowPrivilegeEscalation: ptr(false),
		ReadOnlyRootFilesystem:   ptr(true),
		Capabilities:             &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}},
	}
}

// sidecarDiscovery is the xDS address istio-proxy dials. With a mesh CA
// configured it is the CA's address: the same gRPC server serves ADS there
// over TLS to callers presenting the workload certificate the agent obtains
// from it (the proxy turns TLS on for port 15012). Otherwise, and when the
// pod named its own discoveryAddress, it is discoveryAddress as given. The
// proxyless gRPC bootstrap keeps discoveryAddress (plain text): its
// application has no workload certificate.
func sidecarDiscovery(p *params, cfg *Config) string {
	if cfg.CAAddress != "" && !p.discoveryOwn {
		return cfg.CAAddress
	}
	return p.discovery
}
