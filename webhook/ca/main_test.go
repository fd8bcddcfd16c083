package ca

import (
	"fmt"
	"os"
	"testing"

	"github.com/go-logr/logr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
)

// api is the package's real kube-apiserver and etcd (envtest), shared by
// every test; each test works in namespaces of its own. Nil when the envtest
// tier is not available.
var api struct {
	cfg     *rest.Config
	kube    *kubernetes.Clientset
	certDir string // holds sa-signer.key, the service-account token signing key
}

func TestMain(m *testing.M) {
	ctrllog.SetLogger(logr.Discard())
	os.Exit(run(m))
}

func run(m *testing.M) int {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		return m.Run()
	}
	env := &envtest.Environment{}
	cfg, err := env.Start()
	if err != nil {
		fmt.Fprintf(os.Stderr, "starting envtest (KUBEBUILDER_ASSETS=%s): %v\n", os.Getenv("KUBEBUILDER_ASSETS"), err)
		return 1
	}
	defer func() {
		if err := env.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "stopping envtest: %v\n", err)
		}
	}()
	cfg.QPS, cfg.Burst = 1000, 2000
	api.cfg = cfg
	api.kube = kubernetes.NewForConfigOrDie(cfg)
	api.certDir = env.ControlPlane.APIServer.CertDir
	return m.Run()
}

// envtestSkip skips unless the shared API server is running.
func envtestSkip(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("envtest tier: skipped with -short")
	}
	if api.kube == nil {
		t.Skip("envtest tier: KUBEBUILDER_ASSETS is unset (make test-envtest sets it to test/bin/build-k8s.sh --print-dir)")
	}
}
