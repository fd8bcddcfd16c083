// Package cni is meshlet's chained CNI plugin and its installer. The plugin
// runs after the node's primary CNI plugin: on ADD it reads the pod from the
// API server, and if the injector marked it (sidecar.istio.io/status) it
// installs the capture rules in the pod's network namespace — what the
// privileged istio-init container would otherwise do. The previous result is
// passed through unchanged.
package cni

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"reflect"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	"github.com/containernetworking/cni/pkg/version"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshlet/meshlet/initcni/capture"
)

// PluginType is the plugin's `type` in the conflist and its binary name.
const PluginType = "meshlet-cni"

// CaptureDefaults are the plugin config's capture defaults; unset keys keep
// `meshlet init`'s defaults. Keys follow the pod annotations' names.
type CaptureDefaults struct {
	ProxyPort               *string `json:"proxyPort,omitempty"`
	InboundCapturePort      *string `json:"inboundCapturePort,omitempty"`
	ProxyUID                *string `json:"proxyUID,omitempty"`
	ProxyGID                *string `json:"proxyGID,omitempty"`
	InterceptionMode        *string `json:"interceptionMode,omitempty"`
	IncludeInboundPorts     *string `json:"includeInboundPorts,omitempty"`
	ExcludeInboundPorts     *string `json:"excludeInboundPorts,omitempty"`
	IncludeOutboundIPRanges *string `json:"includeOutboundIPRanges,omitempty"`
	ExcludeOutboundIPRanges *string `json:"excludeOutboundIPRanges,omitempty"`
	IncludeOutboundPorts    *string `json:"includeOutboundPorts,omitempty"`
	ExcludeOutboundPorts    *string `json:"excludeOutboundPorts,omitempty"`
	ExcludeInterfaces       *string `json:"excludeInterfaces,omitempty"`
	IPv6                    *string `json:"ipv6,omitempty"`
}

// jsonName is the plugin config key of an Options field.
func jsonName(field string) string {
	if opt, ok := capture.OptionByField(field); ok {
		return opt.Key
	}
	return field
}

// Options returns `meshlet init`'s defaults overridden by d. Each field's
// JSON key is the Key of a capture option (TestCaptureDefaultsKeys).
func (d CaptureDefaults) Options() capture.Options {
	o := capture.NewOptions()
	v := reflect.ValueOf(d)
	for i := range v.NumField() {
		key, _, _ := strings.Cut(v.Type().Field(i).Tag.Get("json"), ",")
		opt, ok := optionByKey(key)
		if !ok || v.Field(i).IsNil() {
			continue
		}
		*opt.Ptr(&o) = v.Field(i).Elem().String()
	}
	return o
}

func optionByKey(key string) (capture.Option, bool) {
	for _, opt := range capture.OptionSet {
		if opt.Key == key {
			return opt, true
		}
	}
	return capture.Option{}, false
}

// PluginConf is the plugin's entry in the conflist.
type PluginConf struct {
	types.NetConf
	// Kubeconfig is the file the plugin reads the pod with (written by
	// meshlet cni-install).
	Kubeconfig string `json:"kubeconfig"`
	// LogFile receives the plugin's log (appended); empty means stderr.
	LogFile string `json:"logFile,omitempty"`
	// LogLevel is info (default) or debug.
	LogLevel string `json:"logLevel,omitempty"`
	// IPTablesBackend is auto (default), nft or legacy.
	IPTablesBackend string `json:"iptablesBackend,omitempty"`
	// Capture holds the capture defaults pods' annotations override.
	Capture CaptureDefaults `json:"capture,omitempty"`
	// StaticPod, when set, replaces the API lookup: its annotations are
	// used for every pod. For tests and debugging only.
	StaticPod *StaticPod `json:"staticPod,omitempty"`
	// APITimeout bounds the pod lookup (default 10s).
	APITimeout string `json:"apiTimeout,omitempty"`
}

// StaticPod stands in for the API server's answer.
type StaticPod struct {
	Annotations map[string]string `json:"annotations"`
}

// K8sArgs are the Kubernetes fields the runtime passes in CNI_ARGS.
type K8sArgs struct {
	types.CommonArgs
	K8S_POD_NAME               types.UnmarshallableString //nolint:revive,staticcheck // CNI_ARGS key
	K8S_POD_NAMESPACE          types.UnmarshallableString //nolint:revive,staticcheck // CNI_ARGS key
	K8S_POD_INFRA_CONTAINER_ID types.UnmarshallableString //nolint:revive,staticcheck // CNI_ARGS key
	K8S_POD_UID                types.UnmarshallableString //nolint:revive,staticcheck // CNI_ARGS key
}

// PodLookup returns a pod's annotations.
type PodLookup func(ctx context.Context, conf *PluginConf, namespace, name string) (map[string]string, error)

// Plugin implements the CNI verbs. Zero values mean defaults.
type Plugin struct {
	// Lookup reads the pod; default: client-go with conf.Kubeconfig.
	Lookup PodLookup
	// Stdout receives results (default os.Stdout).
	Stdout io.Writer
}

// ParseConf parses the plugin's stdin config and its prevResult.
func ParseConf(data []byte) (*PluginConf, error) {
	conf := &PluginConf{}
	if err := json.Unmarshal(data, conf); err != nil {
		return nil, fmt.Errorf("parsing %s config: %w", PluginType, err)
	}
	if conf.RawPrevResult != nil {
		if err := version.ParsePrevResult(&conf.NetConf); err != nil {
			return nil, fmt.Errorf("parsing prevResult: %w", err)
		}
	}
	if _, err := capture.ParseBackend(conf.IPTablesBackend); err != nil {
		return nil, fmt.Errorf("config iptablesBackend: %w", err)
	}
	return conf, nil
}

func (conf *PluginConf) logger() (*slog.Logger, func()) {
	var w io.Writer = os.Stderr
	closeFn := func() {}
	if conf.LogFile != "" {
		f, err := os.OpenFile(conf.LogFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
		if err == nil {
			w = f
			closeFn = func() { f.Close() }
		}
	}
	level := slog.LevelInfo
	if conf.LogLevel == "debug" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level})).With("plugin", PluginType), closeFn
}

// KubeLookup reads the pod from the API server with conf.Kubeconfig.
func KubeLookup(ctx context.Context, conf *PluginConf, namespace, name string) (map[string]string, error) {
	if conf.StaticPod != nil {
		return conf.StaticPod.Annotations, nil
	}
	if conf.Kubeconfig == "" {
		return nil, errors.New("config kubeconfig is empty")
	}
	rc, err := clientcmd.BuildConfigFromFlags("", conf.Kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("loading kubeconfig %s: %w", conf.Kubeconfig, err)
	}
	rc.Timeout = 5 * time.Second
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, err
	}
	var pod *corev1.Pod
	var lastErr error
	for attempt := 0; ; attempt++ {
		pod, lastErr = cs.CoreV1().Pods(namespace).Get(ctx, name, metav1.GetOptions{})
		if lastErr == nil {
			return pod.Annotations, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("getting pod %s/%s: %w (last error: %w)", namespace, name, ctx.Err(), lastErr)
		case <-time.After(time.Duration(200*(attempt+1)) * time.Millisecond):
		}
	}
}

// decision is what ADD/CHECK do for a pod.
type decision struct {
	capture bool
	reason  string
	config  capture.Config
}

func (p *Plugin) decide(args *skel.CmdArgs, conf *PluginConf, log *slog.Logger) (decision, error) {
	k8s := K8sArgs{}
	if err := types.LoadArgs(args.Args, &k8s); err != nil {
		return decision{}, fmt.Errorf("parsing CNI_ARGS: %w", err)
	}
	ns, name := string(k8s.K8S_POD_NAMESPACE), string(k8s.K8S_POD_NAME)
	if ns == "" || name == "" {
		return decision{reason: "not a Kubernetes pod (no K8S_POD_NAMESPACE/K8S_POD_NAME)"}, nil
	}
	timeout := 10 * time.Second
	if conf.APITimeout != "" {
		d, err := time.ParseDuration(conf.APITimeout)
		if err != nil {
			return decision{}, fmt.Errorf("config apiTimeout %q: %w", conf.APITimeout, err)
		}
		timeout = d
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	lookup := p.Lookup
	if lookup == nil {
		lookup = KubeLookup
	}
	ann, err := lookup(ctx, conf, ns, name)
	if err != nil {
		return decision{}, err
	}
	c, captured, why, err := CaptureFor(conf.Capture.Options(), ann)
	if err != nil {
		return decision{}, fmt.Errorf("pod %s/%s: %w", ns, name, err)
	}
	if !captured {
		return decision{reason: fmt.Sprintf("pod %s/%s %s", ns, name, why)}, nil
	}
	for _, w := range c.Warnings {
		log.Warn("capture option adjusted", "pod", ns+"/"+name, "option", w.Name, "value", w.Value, "effect", w.Problem)
	}
	log.Debug("capture config derived", "pod", ns+"/"+name)
	return decision{capture: true, reason: fmt.Sprintf("pod %s/%s %s", ns, name, why), config: c}, nil
}

func (p *Plugin) target(conf *PluginConf, netns string, log *slog.Logger) capture.Target {
	b, _ := capture.ParseBackend(conf.IPTablesBackend)
	return capture.Target{NetnsPath: netns, Backend: b, Logger: log}
}

// parseChainedConf parses the plugin config of ADD and CHECK, which both need
// the primary plugin's prevResult.
func parseChainedConf(args *skel.CmdArgs) (*PluginConf, error) {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return nil, err
	}
	if conf.PrevResult == nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "meshlet-cni must be chained after a primary plugin",
			"no prevResult in the config")
	}
	return conf, nil
}

// Add installs capture rules for injected pods and passes prevResult through.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	conf, err := parseChainedConf(args)
	if err != nil {
		return err
	}
	log, closeLog := conf.logger()
	defer closeLog()
	log = log.With("container", args.ContainerID, "netns", args.Netns)
	d, err := p.decide(args, conf, log)
	if err != nil {
		log.Error("ADD failed", "err", err)
		return err
	}
	if d.capture {
		if _, err := capture.Apply(context.Background(), d.config, p.target(conf, args.Netns, log)); err != nil {
			log.Error("ADD failed", "err", err)
			return err
		}
	}
	log.Info("ADD", "capture", d.capture, "reason", d.reason)
	return p.print(conf)
}

func (p *Plugin) print(conf *PluginConf) error {
	out := p.Stdout
	if out == nil {
		out = os.Stdout
	}
	r, err := conf.PrevResult.GetAsVersion(conf.CNIVersion)
	if err != nil {
		return err
	}
	return r.PrintTo(out)
}

// Check compares the live rules of an injected pod with the intended ones.
func (p *Plugin) Check(args *skel.CmdArgs) error {
	conf, err := parseChainedConf(args)
	if err != nil {
		return err
	}
	log, closeLog := conf.logger()
	defer closeLog()
	d, err := p.decide(args, conf, log)
	if err != nil || !d.capture {
		return err
	}
	return capture.Check(context.Background(), d.config, p.target(conf, args.Netns, log))
}

// Del does nothing: the rules live and die with the pod's network namespace.
func (p *Plugin) Del(args *skel.CmdArgs) error {
	if _, err := ParseConf(args.StdinData); err != nil {
		return err
	}
	return nil
}

// Status reports whether the plugin can work: its kubeconfig is readable
// and iptables-restore exists.
func (p *Plugin) Status(args *skel.CmdArgs) error {
	conf, err := ParseConf(args.StdinData)
	if err != nil {
		return err
	}
	if conf.StaticPod == nil {
		if _, err := os.Stat(conf.Kubeconfig); err != nil {
			return types.NewError(50 /* plugin not available (CNI spec 1.1) */, "kubeconfig not readable", err.Error())
		}
	}
	return nil
}

// GC has nothing to collect: the plugin keeps no per-attachment state.
func (p *Plugin) GC(args *skel.CmdArgs) error {
	_, err := ParseConf(args.StdinData)
	return err
}

// Funcs returns the skel dispatch table.
func (p *Plugin) Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: p.Add, Del: p.Del, Check: p.Check, Status: p.Status, GC: p.GC}
}

// About is printed when the plugin runs without CNI_COMMAND.
const About = "meshlet-cni: chained CNI plugin installing meshlet's traffic-capture rules"

// SupportedVersions are the CNI spec versions the plugin speaks.
var SupportedVersions = version.All
