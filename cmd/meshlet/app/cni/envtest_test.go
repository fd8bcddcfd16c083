package cni_test

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/initcni/cni"
	"github.com/meshlet/meshlet/test/netlab"
)

// TestEnvtestPrivilegedPodLookup runs the plugin binary's real lookup path:
// client-go with a kubeconfig file against a real kube-apiserver + etcd
// (envtest), real pod netns, real iptables.
func TestEnvtestPrivilegedPodLookup(t *testing.T) {
	if testing.Short() || os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Skip("envtest: skipped under -short or without KUBEBUILDER_ASSETS")
	}
	netlab.Require(t)
	env := &envtest.Environment{}
	rc, err := env.Start()
	if err != nil {
		t.Fatalf("starting envtest: %v", err)
	}
	t.Cleanup(func() { _ = env.Stop() })

	kc := clientcmdapi.NewConfig()
	kc.Clusters["envtest"] = &clientcmdapi.Cluster{Server: rc.Host, CertificateAuthorityData: rc.CAData}
	kc.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: rc.CertData, ClientKeyData: rc.KeyData, Token: rc.BearerToken}
	kc.Contexts["envtest"] = &clientcmdapi.Context{Cluster: "envtest", AuthInfo: "admin"}
	kc.CurrentContext = "envtest"
	kubeconfig := filepath.Join(t.TempDir(), cni.KubeconfigName)
	if err := clientcmd.WriteToFile(*kc, kubeconfig); err != nil {
		t.Fatal(err)
	}

	cs := kubernetes.NewForConfigOrDie(rc)
	ctx := t.Context()
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "mlcap"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	mkPod := func(name string, ann map[string]string) {
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "mlcap", Annotations: ann},
			Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "app"}}},
		}
		if _, err := cs.CoreV1().Pods("mlcap").Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	mkPod("injected", map[string]string{
		capture.AnnotationStatus:                  `{"containers":["istio-proxy"]}`,
		capture.AnnotationIncludeOutboundIPRanges: "10.96.0.0/12",
		capture.AnnotationExcludeInboundPorts:     "8081",
	})
	mkPod("plain", nil)
	mkPod("bad", map[string]string{capture.AnnotationStatus: "{}", capture.AnnotationIncludeInboundPorts: "80,http"})

	dir := pluginDir(t)
	prev := `{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"address":"10.211.70.2/24","interface":0}]}`
	conf := func() []byte {
		b, _ := json.Marshal(map[string]any{
			"cniVersion": "1.0.0", "name": "mlcap", "type": cni.PluginType,
			"kubeconfig": kubeconfig, "apiTimeout": "2s", "prevResult": json.RawMessage(prev),
			"capture": map[string]any{"ipv6": "off"},
		})
		return b
	}

	injected := netlab.NewNS(t, "mlcap-")
	out, err := execPlugin(t, dir, "ADD", injected.Path, podArgs("mlcap", "injected"), conf())
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), "10.211.70.2/24") {
		t.Errorf("ADD did not pass prevResult through: %s", out)
	}
	o := capture.NewOptions()
	o.OutboundIPRanges, o.InboundPortsExclude, o.IPv6 = "10.96.0.0/12", o.InboundPortsExclude+",8081", "off"
	want, err := capture.BuildConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	if err := capture.Check(ctx, want, capture.Target{NetnsPath: injected.Path}); err != nil {
		t.Errorf("rules from the pod's annotations: %v", err)
	}
	if _, err := execPlugin(t, dir, "CHECK", injected.Path, podArgs("mlcap", "injected"), conf()); err != nil {
		t.Errorf("CHECK: %v", err)
	}

	plain := netlab.NewNS(t, "mlcap-")
	if _, err := execPlugin(t, dir, "ADD", plain.Path, podArgs("mlcap", "plain"), conf()); err != nil {
		t.Fatal(err)
	}
	if hasMeshletRules(t, plain) {
		t.Error("pod without the status annotation got rules")
	}

	bad := netlab.NewNS(t, "mlcap-")
	out, err = execPlugin(t, dir, "ADD", bad.Path, podArgs("mlcap", "bad"), conf())
	if err == nil || !strings.Contains(string(out), capture.AnnotationIncludeInboundPorts) || !strings.Contains(string(out), "http") {
		t.Errorf("bad annotation: %v %s", err, out)
	}
	if hasMeshletRules(t, bad) {
		t.Error("pod with a bad annotation got rules")
	}

	missing := netlab.NewNS(t, "mlcap-")
	out, err = execPlugin(t, dir, "ADD", missing.Path, podArgs("mlcap", "gone"), conf())
	if err == nil || !strings.Contains(string(out), "mlcap/gone") {
		t.Errorf("missing pod: %v %s", err, out)
	}
}
