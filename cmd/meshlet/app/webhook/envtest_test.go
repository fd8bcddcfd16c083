package webhook

import (
	"bytes"
	"cmp"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/internal/proctest"
	"github.com/meshlet/meshlet/webhook/registration"
)

func port(t *testing.T) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// TestEnvtestCommand runs `meshlet webhook` as a user would (flags, a
// kubeconfig file, POD_NAMESPACE unset) against a real API server and waits
// for /readyz, checks it stays ready, then waits for a clean exit when its
// context ends.
func TestEnvtestCommand(t *testing.T) {
	if testing.Short() || os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Skip("envtest tier: needs KUBEBUILDER_ASSETS and no -short")
	}
	env := &envtest.Environment{}
	cfg, err := env.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	kube := kubernetes.NewForConfigOrDie(cfg)
	whc := registration.Build(registration.Options{Name: "meshlet-cmd", Namespace: "default", ServiceName: "meshlet-webhook"})
	for i := range whc.Webhooks { // never called: there is no such Service
		whc.Webhooks[i].NamespaceSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"meshlet-test": "never"}}
	}
	if _, err := kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Create(t.Context(), whc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kc := clientcmdapi.NewConfig()
	kc.Clusters["envtest"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos["envtest"] = &clientcmdapi.AuthInfo{ClientCertificateData: cfg.CertData, ClientKeyData: cfg.KeyData}
	kc.Contexts["envtest"] = &clientcmdapi.Context{Cluster: "envtest", AuthInfo: "envtest"}
	kc.CurrentContext = "envtest"
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*kc, kubeconfig); err != nil {
		t.Fatal(err)
	}

	health := fmt.Sprintf("127.0.0.1:%d", port(t))
	metrics := fmt.Sprintf("127.0.0.1:%d", port(t))
	var logs proctest.SyncBuf
	cmd := New(cli.Streams{In: strings.NewReader(""), Out: &logs, Err: &logs})
	cmd.SetArgs([]string{"--kubeconfig", kubeconfig, "--namespace", "default", "--host", "127.0.0.1",
		"--port", fmt.Sprint(port(t)), "--health-addr", health, "--metrics-addr", metrics,
		"--webhook-config-name", "meshlet-cmd", "--cert-check-interval", "200ms"})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	defer cancel()

	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + health + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		select {
		case err := <-done:
			t.Fatalf("meshlet webhook exited: %v\n%s", err, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready within 30s:\n%s", logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	// Once ready it stays ready: 3 s of probes (15 certificate rounds at
	// --cert-check-interval 200ms), every one 200.
	var probes, failed int
	var first string
	for end := time.Now().Add(3 * time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		probes++
		resp, err := http.Get("http://" + health + "/readyz?verbose=1")
		if err != nil {
			failed++
			first = cmp.Or(first, err.Error())
			continue
		}
		var b bytes.Buffer
		_, _ = b.ReadFrom(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			failed++
			first = cmp.Or(first, b.String())
		}
	}
	if failed > 0 {
		t.Errorf("readiness flapped after it was reached: %d of %d probes failed; first:\n%s", failed, probes, first)
	}
	resp, err := http.Get("http://" + metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	var body bytes.Buffer
	_, _ = body.ReadFrom(resp.Body)
	resp.Body.Close()
	for _, m := range []string{"meshlet_webhook_serving_certificate_expiry_timestamp_seconds", "meshlet_webhook_config_last_reload_successful 1"} {
		if !strings.Contains(body.String(), m) {
			t.Errorf("/metrics lacks %q", m)
		}
	}
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("exit after shutdown: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no graceful exit within 30s")
	}
	if !strings.Contains(logs.String(), "Serving admission webhook") {
		t.Errorf("logs lack the start line:\n%s", logs.String())
	}
}
