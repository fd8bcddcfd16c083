package inject

import (
	"fmt"
	"maps"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"

	"github.com/meshlet/meshlet/proxy/xds"
)

// proxyEnv resolves istio-proxy's environment the way the kubelet does for
// the downward API fields the injector uses, for a pod that got IP ip.
func proxyEnv(t *testing.T, pod *corev1.Pod, ip string) map[string]string {
	t.Helper()
	var proxy *corev1.Container
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == ContainerProxy {
			proxy = &pod.Spec.InitContainers[i]
		}
	}
	if proxy == nil {
		t.Fatalf("no %s in the injected pod", ContainerProxy)
	}
	fields := map[string]string{
		"metadata.name":           pod.Name,
		"metadata.namespace":      pod.Namespace,
		"status.podIP":            ip,
		"status.hostIP":           "192.0.2.1",
		"spec.serviceAccountName": pod.Spec.ServiceAccountName,
	}
	env := map[string]string{}
	for _, e := range proxy.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = e.Value
		case e.ValueFrom.FieldRef != nil:
			v, ok := fields[e.ValueFrom.FieldRef.FieldPath]
			if !ok {
				t.Fatalf("env %s: unexpected field %s", e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
			env[e.Name] = v
		}
	}
	return env
}

// TestProxyEnvIsXDSIdentity: what the injector puts into istio-proxy's
// environment is what the proxy's xDS client reads (proxy/xds
// IdentityFromEnv) and what `meshlet proxy` takes its discovery address
// from: Istio's node id, the pod's labels (with the injected tlsMode),
// the service account, the injector's ISTIO_META_* metadata, and the
// config's discovery and CA addresses.
func TestProxyEnvIsXDSIdentity(t *testing.T) {
	cfg := DefaultConfig()
	cfg.DiscoveryAddress, cfg.CAAddress = "istiod.mesh.svc:15010", "istiod.mesh.svc:15012"
	in := testPod()
	in.Labels["version"] = "v1"
	in.Spec.ServiceAccountName = "web-sa"
	out, d, err := Inject(in, Namespace{Name: "shop"}, &cfg, Options{AutoNativeSidecar: true})
	if err != nil || !d.Injected {
		t.Fatalf("Inject: %v %+v", err, d)
	}
	env := proxyEnv(t, out, "10.0.0.7")
	var environ []string
	for k, v := range env {
		environ = append(environ, k+"="+v)
	}
	id, err := xds.IdentityFromEnv(func(k string) string { return env[k] }, environ)
	if err != nil {
		t.Fatalf("IdentityFromEnv of the injected environment: %v\nenv: %v", err, env)
	}
	if got, want := id.NodeID(), "sidecar~10.0.0.7~web.shop~shop.svc.cluster.local"; got != want {
		t.Errorf("node id %q, want %q", got, want)
	}
	wantLabels := map[string]string{"app": "web", "version": "v1", LabelTLSMode: TLSModeIstio}
	if !maps.Equal(id.Labels, wantLabels) {
		t.Errorf("labels %v, want %v", id.Labels, wantLabels)
	}
	if id.ServiceAccount != "web-sa" {
		t.Errorf("service account %q", id.ServiceAccount)
	}
	if id.Meta["INTERCEPTION_MODE"] != ModeRedirect || id.Meta["APP_CONTAINERS"] != "web" {
		t.Errorf("metadata %v: want INTERCEPTION_MODE=%s APP_CONTAINERS=web", id.Meta, ModeRedirect)
	}
	// With a CA the sidecar's xDS goes to the CA's gRPC server (ADS over
	// TLS with the workload certificate).
	if got := env[EnvDiscoveryAddress]; got != cfg.CAAddress {
		t.Errorf("%s=%q, want the CA's %q", EnvDiscoveryAddress, got, cfg.CAAddress)
	}
	if got := env[EnvCAAddress]; got != cfg.CAAddress {
		t.Errorf("%s=%q, want %q", EnvCAAddress, got, cfg.CAAddress)
	}
	// A pod's own discoveryAddress is used as given.
	own := testPod()
	own.Annotations = map[string]string{AnnotationProxyConfig: "discoveryAddress: istiod-canary.istio-system.svc:15010\n"}
	out, _, err = Inject(own, Namespace{Name: "shop"}, &cfg, Options{AutoNativeSidecar: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := proxyEnv(t, out, "10.0.0.7")[EnvDiscoveryAddress]; got != "istiod-canary.istio-system.svc:15010" {
		t.Errorf("pod's own discoveryAddress: %s=%q", EnvDiscoveryAddress, got)
	}
	// Without a CA: the plain-text discovery address.
	cfg.CAAddress = ""
	out, _, err = Inject(testPod(), Namespace{Name: "shop"}, &cfg, Options{AutoNativeSidecar: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := proxyEnv(t, out, "10.0.0.7")[EnvDiscoveryAddress]; got != cfg.DiscoveryAddress {
		t.Errorf("no CA: %s=%q, want %q", EnvDiscoveryAddress, got, cfg.DiscoveryAddress)
	}

	// Static mode: no discovery address, no CA address, the identity
	// variables stay (the agent and its status page use them).
	cfg.DiscoveryAddress, cfg.CAAddress = "", ""
	out, _, err = Inject(testPod(), Namespace{Name: "shop"}, &cfg, Options{AutoNativeSidecar: true})
	if err != nil {
		t.Fatal(err)
	}
	env = proxyEnv(t, out, "10.0.0.7")
	for _, k := range []string{EnvDiscoveryAddress, EnvCAAddress} {
		if v, ok := env[k]; ok {
			t.Errorf("static mode: %s=%q is set", k, v)
		}
	}
	// Without a CA the sidecar has no workload certificate: the pod is not
	// labelled as accepting mutual TLS, so clients' automatic mutual TLS
	// reaches it in plain text.
	if env[EnvLabels] != `{"app":"web"}` {
		t.Errorf("static mode: %s=%q, want the pod's own labels only (no %s without a CA)", EnvLabels, env[EnvLabels], LabelTLSMode)
	}
	if v, ok := out.Labels[LabelTLSMode]; ok {
		t.Errorf("no CA address: the pod is labelled %s=%s; its sidecar has no certificate to accept mutual TLS with", LabelTLSMode, v)
	}
	// Nothing publishes the mesh's roots without a CA: the pod must not
	// wait for the ConfigMap.
	for _, v := range out.Spec.Volumes {
		if v.Name == VolumeCARoot && (v.ConfigMap == nil || v.ConfigMap.Optional == nil || !*v.ConfigMap.Optional) {
			t.Errorf("no CA address: volume %s is not an optional ConfigMap: %+v", v.Name, v.VolumeSource)
		}
	}
}

// TestProxyConfigDiscoveryAddress: proxy.istio.io/config discoveryAddress
// points one pod's sidecar elsewhere; a value that is not host:port is
// refused naming the annotation and the value.
func TestProxyConfigDiscoveryAddress(t *testing.T) {
	cfg := DefaultConfig()
	pod := testPod()
	pod.Annotations = map[string]string{AnnotationProxyConfig: "discoveryAddress: istiod-canary.istio-system.svc:15010\n"}
	out, _, err := Inject(pod, Namespace{Name: "shop"}, &cfg, Options{AutoNativeSidecar: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := proxyEnv(t, out, "10.0.0.7")[EnvDiscoveryAddress]; got != "istiod-canary.istio-system.svc:15010" {
		t.Errorf("%s=%q, want the annotation's address", EnvDiscoveryAddress, got)
	}
	for _, bad := range []string{"istiod", "istiod:0", ":15010", "42"} {
		pod.Annotations[AnnotationProxyConfig] = fmt.Sprintf("discoveryAddress: %q", bad)
		_, d, err := Inject(pod, Namespace{Name: "shop"}, &cfg, Options{AutoNativeSidecar: true})
		if err == nil || d.Injected {
			t.Errorf("discoveryAddress %q: injected (%+v)", bad, d)
			continue
		}
		if msg := err.Error(); !strings.Contains(msg, AnnotationProxyConfig) || !strings.Contains(msg, "discoveryAddress "+bad+" is not host:port") {
			t.Errorf("discoveryAddress %q: error %q does not name the annotation and value", bad, msg)
		}
	}
}

// TestConfigAddresses: discoveryAddress and caAddress may be empty (off)
// or host:port; anything else is a config error naming the field.
func TestConfigAddresses(t *testing.T) {
	for _, tc := range []struct {
		doc, want string
	}{
		{"discoveryAddress: \"\"\ncaAddress: \"\"\n", ""},
		{"discoveryAddress: istiod.x.svc:15010\ncaAddress: istiod.x.svc:15012\n", ""},
		{"discoveryAddress: istiod.x.svc\n", `config field discoveryAddress="istiod.x.svc": not host:port`},
		{"caAddress: istiod:99999\n", `config field caAddress="istiod:99999": port "99999" is not 1-65535`},
	} {
		_, err := LoadConfig([]byte("apiVersion: meshlet.io/v1alpha1\nkind: InjectionConfig\n" + tc.doc))
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%q: %v", tc.doc, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%q: error %v, want %q", tc.doc, err, tc.want)
		}
	}
}

// The defaults document names the variables the proxy reads.
func TestDefaultsDocumentEnv(t *testing.T) {
	doc := string(DefaultsYAML())
	for _, k := range []string{EnvDiscoveryAddress, EnvCAAddress} {
		if !strings.Contains(doc, k) {
			t.Errorf("defaults.yaml does not mention %s", k)
		}
	}
}
