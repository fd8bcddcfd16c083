package inject

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/internal/meshports"
)

// Interception modes of `meshlet init -m`.
const (
	ModeRedirect = string(capture.ModeRedirect)
	ModeTProxy   = string(capture.ModeTProxy)
)

// Fixed ports of the proxy.
const (
	OutboundCapturePort = meshports.Outbound
	InboundCapturePort  = meshports.Inbound
	StatusPort          = meshports.Status
	HealthPort          = meshports.Health
	PrometheusPort      = meshports.Prometheus
)

// captureSettings are the resolved capture options of one pod, checked by
// initcni/capture's builder: what istio-init (or, in CNI mode, the plugin)
// applies.
type captureSettings struct {
	mode string          // the interception mode, canonical
	opts capture.Options // canonical: Config.Options() of the built Config
}

// args renders the `meshlet init` capture flags, every one explicit,
// istio-iptables style, exempting the proxy identity uid/gid (the config's,
// or the pod's own istio-proxy runAsUser/runAsGroup, which the API server
// keeps in 0..2147483647).
func (c captureSettings) args(uid, gid int64) []string {
	o := c.opts
	o.ProxyUID, o.ProxyGID = strconv.FormatInt(uid, 10), strconv.FormatInt(gid, 10)
	return o.Args()
}

// annotations are the effective per-pod capture annotations, in option-set
// order: in CNI mode the injector writes them so the plugin reads exactly
// what the validation container is given as flags.
func (c captureSettings) annotations() [][2]string {
	var out [][2]string
	for _, opt := range capture.OptionSet {
		if opt.Annotation != "" {
			out = append(out, [2]string{opt.Annotation, opt.Get(c.opts)})
		}
	}
	return out
}

// resolveCapture merges the config's capture defaults and the pod's
// annotations (capture.ApplyAnnotations, as the CNI plugin reads them), adds
// the proxy's own ports to the inbound exclusions and runs the result through
// capture's builder, the one `meshlet init` runs on the emitted flags. Every
// problem comes back as an *AnnotationError naming the annotation and its
// value (or a *FieldError for the config), every adjustment the user may not
// expect as a warning.
func resolveCapture(ann map[string]string, cfg *Config) (captureSettings, []string, []error) {
	cc := cfg.Capture
	o := capture.Options{
		ProxyPort:               strconv.Itoa(meshports.Outbound),
		InboundCapturePort:      strconv.Itoa(meshports.Inbound),
		ProxyUID:                strconv.FormatInt(cfg.ProxyUID, 10),
		ProxyGID:                strconv.FormatInt(cfg.ProxyGID, 10),
		InterceptionMode:        cc.InterceptionMode,
		InboundPorts:            cc.IncludeInboundPorts,
		InboundPortsExclude:     cc.ExcludeInboundPorts,
		OutboundIPRanges:        cc.IncludeOutboundIPRanges,
		OutboundIPRangesExclude: cc.ExcludeOutboundIPRanges,
		OutboundPorts:           cc.IncludeOutboundPorts,
		OutboundPortsExclude:    cc.ExcludeOutboundPorts,
		ExcludeInterfaces:       cc.ExcludeInterfaces,
	}
	configured := o // the config's values, for messages
	// The sidecar's own ports are never captured inbound; the pod's
	// excludeInboundPorts adds to them (Istio's -d "15090,15021,..."
	// order; the CNI plugin, adding the annotation to its own defaults,
	// then keeps the order too).
	for _, p := range meshports.NeverCapturedInbound {
		if strings.TrimSpace(o.InboundPortsExclude) != "" {
			o.InboundPortsExclude += ","
		}
		o.InboundPortsExclude += strconv.Itoa(int(p))
	}
	from := capture.ApplyAnnotations(&o, ann)
	// Interception mode NONE (Istio's: no capture at all) is the injector's
	// business, not the rules': the other options are still checked, as
	// for REDIRECT, so a bad value is never silently ignored.
	none := strings.EqualFold(strings.TrimSpace(o.InterceptionMode), ModeNone)
	var noneWarning string
	if none {
		if o.InterceptionMode != ModeNone {
			noneWarning = fmt.Sprintf("%s=%q: read as %s", modeSource(from), o.InterceptionMode, ModeNone)
		}
		o.InterceptionMode = ModeRedirect
	}
	name := func(field string) string {
		if a, ok := from[field]; ok {
			return "annotation " + a
		}
		return "config field " + configField(field)
	}
	c, err := capture.BuildConfigNamed(o, name)
	var errs []error
	for _, oe := range capture.OptionErrors(err) {
		if oe.Field == "InterceptionMode" && !strings.EqualFold(strings.TrimSpace(oe.Value), ModeTProxy) {
			// The injector also takes NONE.
			oe.Problem = fmt.Sprintf("must be %s or %s (%s is recognised but not yet supported)", ModeRedirect, ModeNone, ModeTProxy)
		}
		errs = append(errs, captureProblem(oe, from, ann, configured))
	}
	if err != nil && len(errs) == 0 {
		errs = append(errs, err)
	}
	var warnings []string
	for _, w := range c.Warnings {
		warnings = append(warnings, captureProblem(w, from, ann, configured).Error())
	}
	if len(errs) > 0 {
		return captureSettings{}, warnings, errs
	}
	if none {
		if noneWarning != "" {
			warnings = append(warnings, noneWarning)
		}
		return captureSettings{mode: ModeNone}, warnings, nil
	}
	return captureSettings{mode: string(c.Mode), opts: c.Options()}, warnings, nil
}

// modeSource names where the interception mode came from, for a warning.
func modeSource(from map[string]string) string {
	if a, ok := from["InterceptionMode"]; ok {
		return "annotation " + a
	}
	return "config field capture.interceptionMode"
}

// configField names an Options field by its injection config key.
func configField(field string) string {
	switch field {
	case "ProxyUID":
		return "proxyUID"
	case "ProxyGID":
		return "proxyGID"
	}
	if opt, ok := capture.OptionByField(field); ok {
		return "capture." + opt.Key
	}
	return field
}

// captureProblem turns one of the builder's problems into an annotation
// problem or a config problem, each with the value as written there.
func captureProblem(oe *capture.OptionError, from, ann map[string]string, configured capture.Options) error {
	if a, ok := from[oe.Field]; ok {
		return &AnnotationError{Key: a, Value: ann[a], Problem: oe.Problem}
	}
	v := oe.Value
	if opt, ok := capture.OptionByField(oe.Field); ok {
		v = opt.Get(configured)
	}
	return &FieldError{Field: configField(oe.Field), Value: v, Problem: oe.Problem}
}

// checkCaptureValue validates one capture value of the injection config on
// its own, through capture's builder (as the option of the given field).
func checkCaptureValue(field string) func(string) (string, error) {
	return func(v string) (string, error) {
		o := capture.NewOptions()
		opt, ok := capture.OptionByField(field)
		if !ok {
			return "", fmt.Errorf("no capture option %s", field)
		}
		*opt.Ptr(&o) = v
		_, err := capture.BuildConfigNamed(o, capture.FlagNamer)
		var problems []string
		for _, oe := range capture.OptionErrors(err) {
			if oe.Field == field {
				problems = append(problems, oe.Problem)
			}
		}
		if len(problems) > 0 {
			return "", errors.New(strings.Join(problems, "; "))
		}
		return v, nil
	}
}

// The validators Config.Validate applies to the capture section.
var (
	parsePortsOrStar = checkCaptureValue("InboundPorts")
	parsePorts       = checkCaptureValue("OutboundPortsExclude")
	parseCIDRsOrStar = checkCaptureValue("OutboundIPRanges")
	parseCIDRs       = checkCaptureValue("OutboundIPRangesExclude")
	parseInterfaces  = checkCaptureValue("ExcludeInterfaces")
)

// splitList splits a comma-separated list, trimming blanks and dropping
// empty items.
func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}
