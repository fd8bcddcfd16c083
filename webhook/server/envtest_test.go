package server

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"
	"github.com/prometheus/client_golang/prometheus/testutil"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/controller-runtime/pkg/webhook/admission"

	"github.com/meshlet/meshlet/webhook/certs"
	"github.com/meshlet/meshlet/webhook/inject"
	"github.com/meshlet/meshlet/webhook/registration"
)

const (
	etNamespace  = "meshlet-system"
	etSecret     = "meshlet-webhook-certs"
	etService    = "meshlet-webhook"
	etRelabelCfg = "zz-meshlet-test-relabel" // sorts after ours: called after it
)

// envtestSkip skips unless a real kube-apiserver and etcd are available.
func envtestSkip(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("envtest tier: skipped with -short")
	}
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		t.Skip("envtest tier: KUBEBUILDER_ASSETS is unset (make test-envtest sets it to test/bin/build-k8s.sh --print-dir)")
	}
}

// freePort returns a loopback port that was free a moment ago.
func freePort(t testing.TB) int {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port
}

// cluster is a real kube-apiserver + etcd with the meshlet webhook running
// against it, registered by the real MutatingWebhookConfiguration (pointing at
// the local port instead of a Service), with caBundle left empty for the
// webhook's own certificate reconciler to fill.
type cluster struct {
	cfg        *rest.Config
	kube       *kubernetes.Clientset
	srv        *Server
	port       int
	healthAddr string
	configPath string
	relabels   atomic.Int64
	stop       context.CancelFunc
	done       chan error
}

type clusterOptions struct {
	certValidity, caValidity time.Duration
	// asUser runs the webhook as this user (impersonated), with only the
	// permissions of ClusterRole etRole, which the test may change.
	asUser string
}

// etRole is the ClusterRole of a webhook started with clusterOptions.asUser:
// what the chart's RBAC grants, plus create on secrets (the chart ships the
// Secret; here the webhook creates it).
const etRole = "meshlet-webhook-test"

func webhookRules() []rbacv1.PolicyRule {
	return []rbacv1.PolicyRule{
		{APIGroups: []string{""}, Resources: []string{"namespaces"}, Verbs: []string{"get", "list", "watch"}},
		{APIGroups: []string{"admissionregistration.k8s.io"}, Resources: []string{"mutatingwebhookconfigurations"},
			ResourceNames: []string{registration.DefaultName, etRelabelCfg}, Verbs: []string{"get", "update"}},
		{APIGroups: []string{""}, Resources: []string{"secrets"}, ResourceNames: []string{etSecret}, Verbs: []string{"get", "update"}},
		{APIGroups: []string{""}, Resources: []string{"secrets"}, Verbs: []string{"create"}},
	}
}

func startCluster(t *testing.T, o clusterOptions) *cluster {
	t.Helper()
	envtestSkip(t)
	env := &envtest.Environment{}
	restCfg, err := env.Start()
	if err != nil {
		t.Fatalf("starting envtest (KUBEBUILDER_ASSETS=%s): %v", os.Getenv("KUBEBUILDER_ASSETS"), err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Logf("stopping envtest: %v", err)
		}
	})
	restCfg.QPS, restCfg.Burst = 1000, 2000
	c := &cluster{cfg: restCfg, port: freePort(t), healthAddr: fmt.Sprintf("127.0.0.1:%d", freePort(t)), done: make(chan error, 1)}
	c.kube = kubernetes.NewForConfigOrDie(restCfg)
	ctx := t.Context()

	for _, ns := range []string{etNamespace, "apps", "plain"} {
		obj := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}
		if ns == "apps" {
			obj.Labels = map[string]string{"istio-injection": "enabled"}
		}
		if _, err := c.kube.CoreV1().Namespaces().Create(ctx, obj, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	url := fmt.Sprintf("https://127.0.0.1:%d", c.port)
	whc := registration.Build(registration.Options{Namespace: etNamespace, URL: url + registration.DefaultPath})
	if _, err := c.kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Create(ctx, whc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// A second webhook that changes injected pods after meshlet did, so the
	// API server re-invokes meshlet (reinvocationPolicy: IfNeeded).
	relabel := registration.Build(registration.Options{Name: etRelabelCfg, Namespace: etNamespace, URL: url + "/relabel"})
	relabel.Webhooks = relabel.Webhooks[:1]
	never := admissionregistrationv1.NeverReinvocationPolicy
	relabel.Webhooks[0].ReinvocationPolicy = &never
	relabel.Webhooks[0].ObjectSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"relabel": "please"}}
	if _, err := c.kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Create(ctx, relabel, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	webhookCfg := restCfg
	if o.asUser != "" {
		role := &rbacv1.ClusterRole{ObjectMeta: metav1.ObjectMeta{Name: etRole}, Rules: webhookRules()}
		if _, err := c.kube.RbacV1().ClusterRoles().Create(ctx, role, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		binding := &rbacv1.ClusterRoleBinding{
			ObjectMeta: metav1.ObjectMeta{Name: etRole},
			RoleRef:    rbacv1.RoleRef{APIGroup: rbacv1.GroupName, Kind: "ClusterRole", Name: etRole},
			Subjects:   []rbacv1.Subject{{Kind: rbacv1.UserKind, APIGroup: rbacv1.GroupName, Name: o.asUser}},
		}
		if _, err := c.kube.RbacV1().ClusterRoleBindings().Create(ctx, binding, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		webhookCfg = rest.CopyConfig(restCfg)
		webhookCfg.Impersonate = rest.ImpersonationConfig{UserName: o.asUser}
	}

	c.configPath = filepath.Join(t.TempDir(), "config.yaml")
	writeFile(t, c.configPath, "apiVersion: meshlet.io/v1alpha1\nkind: InjectionConfig\nimage: meshlet/meshlet:envtest-1\n")

	runCtx, cancel := context.WithCancel(context.Background())
	c.stop = cancel
	started := make(chan *Server, 1)
	go func() {
		c.done <- Run(runCtx, Config{
			RestConfig: webhookCfg, Host: "127.0.0.1", Port: c.port,
			MetricsAddr: "0", HealthAddr: c.healthAddr,
			Namespace: etNamespace, ServiceName: etService, ExtraIPs: []net.IP{net.ParseIP("127.0.0.1")},
			WebhookConfigNames: []string{registration.DefaultName, etRelabelCfg},
			CertMode:           CertModeSelf, SecretName: etSecret,
			CertValidity: o.certValidity, CAValidity: o.caValidity, CertInterval: 100 * time.Millisecond,
			ConfigPath: c.configPath, ConfigPollInterval: 100 * time.Millisecond,
			Log: testr.NewWithOptions(t, testr.Options{Verbosity: 0}),
			Started: func(s *Server) {
				s.Manager.GetWebhookServer().Register("/relabel", &admission.Webhook{Handler: admission.HandlerFunc(c.relabel)})
				started <- s
			},
		})
	}()
	select {
	case c.srv = <-started:
	case err := <-c.done:
		t.Fatalf("webhook server exited: %v", err)
	}
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-c.done:
			if err != nil {
				t.Errorf("webhook server: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("webhook server did not shut down within 30s")
		}
	})
	c.waitReady(t)
	return c
}

// relabel adds a label to pods meshlet already injected, once.
func (c *cluster) relabel(_ context.Context, req admission.Request) admission.Response {
	var pod corev1.Pod
	if err := json.Unmarshal(req.Object.Raw, &pod); err != nil {
		return admission.Errored(http.StatusBadRequest, err)
	}
	if pod.Labels["relabelled"] == "yes" {
		return admission.Allowed("")
	}
	c.relabels.Add(1)
	out := pod.DeepCopy()
	out.Labels["relabelled"] = "yes"
	b, _ := json.Marshal(out)
	return admission.PatchResponseFromRaw(req.Object.Raw, b)
}

// waitReady waits for /readyz to answer 200, then keeps polling it for a
// second: every answer must be 200 (a replica that is ready stays ready while
// nothing changes; the namespace-cache check used to fail every other probe).
func (c *cluster) waitReady(t *testing.T) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var last string
	for {
		code, body, err := c.readyz("")
		if err == nil && code == http.StatusOK {
			break
		}
		last = fmt.Sprint(code, " ", body, err)
		if time.Now().After(deadline) {
			t.Fatalf("webhook not ready after 30s: %s", last)
		}
		time.Sleep(100 * time.Millisecond)
	}
	c.stayReady(t, time.Second)
}

// stayReady polls /readyz every 10 ms for d; every answer must be 200.
func (c *cluster) stayReady(t *testing.T, d time.Duration) {
	t.Helper()
	var n, bad int
	var first string
	for end := time.Now().Add(d); time.Now().Before(end); time.Sleep(10 * time.Millisecond) {
		n++
		if code, body, err := c.readyz(""); err != nil || code != http.StatusOK {
			if bad++; first == "" {
				first = fmt.Sprint(code, " ", body, err)
			}
		}
	}
	if bad > 0 {
		t.Fatalf("readiness flapped after it was reached: %d of %d probes failed, first: %s", bad, n, first)
	}
}

// readyz asks /readyz (check empty) or /readyz/<check>, verbose, and returns
// the status code and body.
func (c *cluster) readyz(check string) (int, string, error) {
	path := "/readyz"
	if check != "" {
		path += "/" + check
	}
	resp, err := readyClient.Get("http://" + c.healthAddr + path + "?verbose=1")
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	var b bytes.Buffer
	_, _ = b.ReadFrom(resp.Body)
	return resp.StatusCode, b.String(), nil
}

var readyClient = &http.Client{Timeout: 5 * time.Second}

func writeFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil { // atomic, like a ConfigMap volume update
		t.Fatal(err)
	}
}

func testPod(name string, labels, annotations map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels, Annotations: annotations},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "app", Image: "nginx:1.27",
			Ports: []corev1.ContainerPort{{ContainerPort: 8080}}}}},
	}
}

func (c *cluster) create(t *testing.T, ns string, pod *corev1.Pod, opts metav1.CreateOptions) (*corev1.Pod, error) {
	t.Helper()
	return c.kube.CoreV1().Pods(ns).Create(t.Context(), pod, opts)
}

func proxyCount(pod *corev1.Pod) int {
	n := 0
	for _, cs := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, ct := range cs {
			if ct.Name == inject.ContainerProxy {
				n++
			}
		}
	}
	return n
}

func proxyImage(pod *corev1.Pod) string {
	for _, cs := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, ct := range cs {
			if ct.Name == inject.ContainerProxy {
				return ct.Image
			}
		}
	}
	return ""
}

func eventually(t *testing.T, what string, timeout time.Duration, f func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for time.Now().Before(deadline) {
		if err = f(); err == nil {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("%s: not within %v: %v", what, timeout, err)
}

// TestEnvtestWebhook runs the real webhook against a real API server and
// creates pods through the API.
func TestEnvtestWebhook(t *testing.T) {
	c := startCluster(t, clusterOptions{})
	m := c.srv.Metrics

	t.Run("injected in a labelled namespace", func(t *testing.T) {
		pod, err := c.create(t, "apps", testPod("web", nil, nil), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if proxyCount(pod) != 1 || pod.Annotations[inject.AnnotationStatus] == "" {
			t.Fatalf("pod not injected: %d istio-proxy, annotations %v", proxyCount(pod), pod.Annotations)
		}
		// The API server is v1.31: nativeSidecar auto means native.
		if len(pod.Spec.InitContainers) < 2 || pod.Spec.InitContainers[1].Name != inject.ContainerProxy ||
			pod.Spec.InitContainers[1].RestartPolicy == nil {
			t.Errorf("want istio-proxy as a native sidecar (second init container), got %v", pod.Spec.InitContainers)
		}
		if got := proxyImage(pod); got != "meshlet/meshlet:envtest-1" {
			t.Errorf("proxy image %q, want the one from the config file", got)
		}
	})

	t.Run("untouched", func(t *testing.T) {
		cases := []struct {
			ns  string
			pod *corev1.Pod
		}{
			{"plain", testPod("plain", nil, nil)},
			{"apps", testPod("opted-out", map[string]string{"sidecar.istio.io/inject": "false"}, nil)},
			{"kube-system", testPod("system", map[string]string{"sidecar.istio.io/inject": "true"}, nil)},
			{etNamespace, testPod("own", map[string]string{"sidecar.istio.io/inject": "true"}, nil)},
		}
		for _, tc := range cases {
			before := testutil.ToFloat64(m.RequestsTotal.WithLabelValues("false"))
			pod, err := c.create(t, tc.ns, tc.pod, metav1.CreateOptions{})
			if err != nil {
				t.Fatalf("%s/%s: %v", tc.ns, tc.pod.Name, err)
			}
			if proxyCount(pod) != 0 || len(pod.Spec.InitContainers) != 0 {
				t.Errorf("%s/%s was injected", tc.ns, tc.pod.Name)
			}
			// The selectors keep these pods away from the webhook entirely.
			if after := testutil.ToFloat64(m.RequestsTotal.WithLabelValues("false")); after != before {
				t.Errorf("%s/%s reached the webhook (%v requests); the configuration's selectors should exclude it", tc.ns, tc.pod.Name, after-before)
			}
		}
	})

	t.Run("opted-in pod in a plain namespace", func(t *testing.T) {
		pod, err := c.create(t, "plain", testPod("opt-in", map[string]string{"sidecar.istio.io/inject": "true"}, nil), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if proxyCount(pod) != 1 {
			t.Fatal("opted-in pod not injected")
		}
	})

	t.Run("deployment's pod", func(t *testing.T) {
		// envtest runs no controller-manager: create the Deployment, then a
		// pod from its template the way the ReplicaSet controller would.
		replicas := int32(1)
		dep := &appsv1.Deployment{
			ObjectMeta: metav1.ObjectMeta{Name: "shop"},
			Spec: appsv1.DeploymentSpec{
				Replicas: &replicas,
				Selector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "shop"}},
				Template: corev1.PodTemplateSpec{
					ObjectMeta: metav1.ObjectMeta{Labels: map[string]string{"app": "shop"}},
					Spec:       testPod("", nil, nil).Spec,
				},
			},
		}
		dep, err := c.kube.AppsV1().Deployments("apps").Create(t.Context(), dep, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if proxyCount(&corev1.Pod{Spec: dep.Spec.Template.Spec}) != 0 {
			t.Fatal("the Deployment's template must not be mutated (only pods are)")
		}
		pod := &corev1.Pod{
			ObjectMeta: *dep.Spec.Template.ObjectMeta.DeepCopy(),
			Spec:       *dep.Spec.Template.Spec.DeepCopy(),
		}
		pod.GenerateName = "shop-5d4f8c-"
		pod.OwnerReferences = []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "Deployment", Name: dep.Name, UID: dep.UID}}
		got, err := c.create(t, "apps", pod, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if proxyCount(got) != 1 {
			t.Fatalf("pod %s from the Deployment's template not injected", got.Name)
		}
	})

	t.Run("dry-run injects but leaves no trace", func(t *testing.T) {
		injected := testutil.ToFloat64(m.InjectionsTotal)
		dry := testutil.ToFloat64(m.RequestsTotal.WithLabelValues("true"))
		pod, err := c.create(t, "apps", testPod("dry", nil, nil), metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		if err != nil {
			t.Fatal(err)
		}
		if proxyCount(pod) != 1 {
			t.Fatal("dry-run response not injected")
		}
		if _, err := c.kube.CoreV1().Pods("apps").Get(t.Context(), "dry", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Errorf("dry-run pod exists afterwards (err=%v)", err)
		}
		if got := testutil.ToFloat64(m.InjectionsTotal); got != injected {
			t.Errorf("injections_total moved %v → %v on a dry-run", injected, got)
		}
		if got := testutil.ToFloat64(m.RequestsTotal.WithLabelValues("true")); got != dry+1 {
			t.Errorf(`requests_total{dry_run="true"} = %v, want %v`, got, dry+1)
		}
	})

	t.Run("invalid annotations denied", func(t *testing.T) {
		_, err := c.create(t, "apps", testPod("bad", nil, map[string]string{
			"traffic.sidecar.istio.io/excludeInboundPorts": "http",
			"sidecar.istio.io/proxyCPU":                    "lots",
		}), metav1.CreateOptions{})
		if err == nil {
			t.Fatal("pod with invalid annotations admitted")
		}
		for _, want := range []string{"denied the request", "traffic.sidecar.istio.io/excludeInboundPorts", `"http"`, "sidecar.istio.io/proxyCPU"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error %q does not contain %q", err, want)
			}
		}
	})

	t.Run("re-invocation is idempotent", func(t *testing.T) {
		before := testutil.ToFloat64(m.RequestsTotal.WithLabelValues("false"))
		relabels := c.relabels.Load()
		pod, err := c.create(t, "apps", testPod("reinvoked", map[string]string{"relabel": "please"}, nil), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if c.relabels.Load() != relabels+1 || pod.Labels["relabelled"] != "yes" {
			t.Fatal("the later webhook did not change the pod; re-invocation not exercised")
		}
		if calls := testutil.ToFloat64(m.RequestsTotal.WithLabelValues("false")) - before; calls != 2 {
			t.Errorf("meshlet was called %v times for the pod, want 2 (initial + re-invocation)", calls)
		}
		if n := proxyCount(pod); n != 1 {
			t.Errorf("%d istio-proxy containers after re-invocation, want 1", n)
		}
	})

	t.Run("config reload with last-good fallback", func(t *testing.T) {
		fails := testutil.ToFloat64(m.ConfigReloads.WithLabelValues("failure"))
		writeFile(t, c.configPath, "apiVersion: meshlet.io/v1alpha1\nkind: InjectionConfig\nimage: meshlet/meshlet:envtest-2\nproxyUID: -5\n")
		eventually(t, "bad config rejected", 10*time.Second, func() error {
			if testutil.ToFloat64(m.ConfigReloads.WithLabelValues("failure")) == fails {
				return fmt.Errorf("no failed reload counted")
			}
			return nil
		})
		if v := testutil.ToFloat64(m.ConfigValid); v != 0 {
			t.Errorf("config_last_reload_successful = %v after a bad config, want 0", v)
		}
		pod, err := c.create(t, "apps", testPod("after-bad-config", nil, nil), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got := proxyImage(pod); got != "meshlet/meshlet:envtest-1" {
			t.Errorf("after a rejected config the proxy image is %q, want the last good one", got)
		}
		writeFile(t, c.configPath, "apiVersion: meshlet.io/v1alpha1\nkind: InjectionConfig\nimage: meshlet/meshlet:envtest-3\n")
		eventually(t, "good config applied", 10*time.Second, func() error {
			if c.srv.Config.Current().Image != "meshlet/meshlet:envtest-3" {
				return fmt.Errorf("image still %s", c.srv.Config.Current().Image)
			}
			return nil
		})
		pod, err = c.create(t, "apps", testPod("after-good-config", nil, nil), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got := proxyImage(pod); got != "meshlet/meshlet:envtest-3" {
			t.Errorf("proxy image %q, want the new config's", got)
		}
	})

	t.Run("caBundle reconciled after a wipe", func(t *testing.T) {
		api := c.kube.AdmissionregistrationV1().MutatingWebhookConfigurations()
		cfg, err := api.Get(t.Context(), registration.DefaultName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for i := range cfg.Webhooks {
			cfg.Webhooks[i].ClientConfig.CABundle = nil
		}
		if _, err := api.Update(t.Context(), cfg, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		secret, err := c.kube.CoreV1().Secrets(etNamespace).Get(t.Context(), etSecret, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		eventually(t, "caBundle restored", 10*time.Second, func() error {
			cfg, err := api.Get(t.Context(), registration.DefaultName, metav1.GetOptions{})
			if err != nil {
				return err
			}
			for _, wh := range cfg.Webhooks {
				if !bytes.Equal(wh.ClientConfig.CABundle, secret.Data[certs.KeyCABundle]) {
					return fmt.Errorf("webhook %s caBundle is %d bytes, want the Secret's ca.crt", wh.Name, len(wh.ClientConfig.CABundle))
				}
			}
			return nil
		})
		c.waitReady(t)
		pod, err := c.create(t, "apps", testPod("after-wipe", nil, nil), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if proxyCount(pod) != 1 {
			t.Fatal("pod not injected after the caBundle came back")
		}
	})

	t.Run("webhook configuration installed after the webhook", func(t *testing.T) {
		const name, secret = "meshlet-late", "meshlet-late-certs"
		src, err := certs.NewSelfIssued(certs.SelfIssuedOptions{
			Client: c.kube, Namespace: etNamespace, SecretName: secret, WebhookConfigNames: []string{name},
			Policy: certs.Policy{DNSNames: Config{Namespace: etNamespace, ServiceName: etService}.DNSNames()},
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := src.Reconcile(t.Context()); !errors.Is(err, certs.ErrNotInstalled) {
			t.Fatalf("Reconcile without the configuration = %v, want ErrNotInstalled", err)
		}
		if src.Ready(nil) == nil {
			t.Error("ready although the configuration does not exist")
		}
		if _, err := c.kube.CoreV1().Secrets(etNamespace).Get(t.Context(), secret, metav1.GetOptions{}); err != nil {
			t.Errorf("certificates not stored while waiting: %v", err)
		}
		whc := registration.Build(registration.Options{Name: name, Namespace: etNamespace, ServiceName: etService})
		for i := range whc.Webhooks { // never called: no such Service here
			whc.Webhooks[i].NamespaceSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"meshlet-test": "never"}}
		}
		if _, err := c.kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Create(t.Context(), whc, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			_ = c.kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Delete(context.Background(), name, metav1.DeleteOptions{})
		})
		if err := src.Reconcile(t.Context()); err != nil {
			t.Fatal(err)
		}
		if err := src.Ready(nil); err != nil {
			t.Errorf("not ready after publishing: %v", err)
		}
	})

	t.Run("second replica shares the Secret", func(t *testing.T) {
		secret, err := c.kube.CoreV1().Secrets(etNamespace).Get(t.Context(), etSecret, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		other, err := certs.NewSelfIssued(certs.SelfIssuedOptions{
			Client: c.kube, Namespace: etNamespace, SecretName: etSecret,
			WebhookConfigNames: []string{registration.DefaultName},
			Policy:             certs.Policy{DNSNames: Config{Namespace: etNamespace, ServiceName: etService}.DNSNames(), IPs: []net.IP{net.ParseIP("127.0.0.1")}},
		})
		if err != nil {
			t.Fatal(err)
		}
		if err := other.Reconcile(t.Context()); err != nil {
			t.Fatal(err)
		}
		after, err := c.kube.CoreV1().Secrets(etNamespace).Get(t.Context(), etSecret, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if after.ResourceVersion != secret.ResourceVersion {
			t.Error("a second replica with the same policy rewrote the Secret; it should adopt it")
		}
		mine, _ := c.srv.Certs.GetCertificate(nil)
		theirs, _ := other.GetCertificate(nil)
		if !bytes.Equal(mine.Certificate[0], theirs.Certificate[0]) {
			t.Error("the replicas serve different certificates")
		}
	})
}

// TestEnvtestCertManagerMode checks the read-only source: it serves the
// mounted certificate, reloads it when the files change, and is ready only
// while the webhook configuration's caBundle (cert-manager's cainjector's
// job) trusts it. It never writes to the API server.
func TestEnvtestCertManagerMode(t *testing.T) {
	envtestSkip(t)
	env := &envtest.Environment{}
	restCfg, err := env.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	kube := kubernetes.NewForConfigOrDie(restCfg)
	ctx := t.Context()
	dns := Config{Namespace: etNamespace, ServiceName: etService}.DNSNames()

	issue := func() (caPEM, crt, key []byte) {
		now := time.Now()
		ca, caPEM, _, err := certs.NewAuthority(now, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		crt, key, err = ca.Issue(now, time.Hour, dns, nil)
		if err != nil {
			t.Fatal(err)
		}
		return caPEM, crt, key
	}
	dir := t.TempDir()
	ca1, crt1, key1 := issue()
	writeFile(t, filepath.Join(dir, certs.KeyCert), string(crt1))
	writeFile(t, filepath.Join(dir, certs.KeyKey), string(key1))
	whc := registration.Build(registration.Options{Namespace: etNamespace, ServiceName: etService, CABundle: ca1})
	created, err := kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Create(ctx, whc, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	src, err := certs.NewFiles(certs.FilesOptions{Dir: dir, Client: kube, WebhookConfigNames: []string{whc.Name}, DNSName: dns[0]})
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() { _ = src.Start(runCtx) }()
	if err := src.Ready(nil); err != nil {
		t.Fatalf("mounted certificate trusted by caBundle: want ready, got %v", err)
	}
	// cert-manager renews into a new CA; until cainjector catches up the
	// webhook is not ready, and it serves the new certificate at once.
	ca2, crt2, key2 := issue()
	writeFile(t, filepath.Join(dir, certs.KeyCert), string(crt2))
	writeFile(t, filepath.Join(dir, certs.KeyKey), string(key2))
	eventually(t, "new certificate served", 15*time.Second, func() error {
		c, err := src.GetCertificate(nil)
		if err != nil {
			return err
		}
		if !bytes.Contains(crt2, pemOf(c.Certificate[0])) {
			return fmt.Errorf("still serving the old certificate")
		}
		return nil
	})
	if err := src.Ready(nil); err == nil {
		t.Error("caBundle does not trust the new certificate: want not ready")
	}
	cfg, err := kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Get(ctx, whc.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.ResourceVersion != created.ResourceVersion {
		t.Error("cert-manager mode wrote the webhook configuration")
	}
	for i := range cfg.Webhooks {
		cfg.Webhooks[i].ClientConfig.CABundle = ca2
	}
	if _, err := kube.AdmissionregistrationV1().MutatingWebhookConfigurations().Update(ctx, cfg, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := src.Ready(nil); err != nil {
		t.Errorf("after cainjector's update: want ready, got %v", err)
	}
}

func pemOf(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// TestEnvtestRotation forces short-lived certificates (serving: 3 s, CA: 9 s)
// and creates pods without pause while the serving certificate is renewed
// several times and the CA is rotated once: no admission may fail. Besides
// the API server's own calls (which may reuse a kept-alive connection), a
// fresh TLS handshake is made with the published caBundle every round.
func TestEnvtestRotation(t *testing.T) {
	c := startCluster(t, clusterOptions{certValidity: 3 * time.Second, caValidity: 9 * time.Second})
	api := c.kube.AdmissionregistrationV1().MutatingWebhookConfigurations()
	ctx := t.Context()

	serials := map[string]bool{}
	cas := map[string]bool{}
	var created, failed int
	var failures []string
	deadline := time.Now().Add(12 * time.Second)
	// Readiness is probed all along: a certificate or CA rotation changes
	// nothing the API server relies on, so the replica stays ready.
	type probes struct {
		n, bad int
		first  string
	}
	probed := make(chan probes, 1)
	go func() {
		var p probes
		for time.Now().Before(deadline) {
			p.n++
			if code, body, err := c.readyz(""); err != nil || code != http.StatusOK {
				if p.bad++; p.first == "" {
					p.first = fmt.Sprint(code, " ", body, err)
				}
			}
			time.Sleep(20 * time.Millisecond)
		}
		probed <- p
	}()
	for i := 0; time.Now().Before(deadline); i++ {
		pod, err := c.create(t, "apps", testPod(fmt.Sprintf("rot-%d", i), nil, nil), metav1.CreateOptions{})
		created++
		if err != nil || proxyCount(pod) != 1 {
			failed++
			failures = append(failures, fmt.Sprint(err))
		}
		// A new connection, verified against what the API server trusts now.
		cfg, err := api.Get(ctx, registration.DefaultName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		pool := x509.NewCertPool()
		pool.AppendCertsFromPEM(cfg.Webhooks[0].ClientConfig.CABundle)
		conn, err := tls.Dial("tcp", fmt.Sprintf("127.0.0.1:%d", c.port), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
		if err != nil {
			failed++
			failures = append(failures, "handshake: "+err.Error())
		} else {
			leaf := conn.ConnectionState().PeerCertificates[0]
			serials[leaf.SerialNumber.String()] = true
			cas[string(leaf.AuthorityKeyId)] = true
			conn.Close()
		}
		time.Sleep(50 * time.Millisecond)
	}
	p := <-probed
	t.Logf("%d pod creations, %d failures, %d serving certificates seen, %d CAs seen; %d readiness probes, %d failed",
		created, failed, len(serials), len(cas), p.n, p.bad)
	if p.bad > 0 {
		t.Errorf("readiness dropped during rotation: %d of %d probes failed, first: %s", p.bad, p.n, p.first)
	}
	if failed > 0 {
		t.Errorf("%d admissions/handshakes failed during rotation: %v", failed, failures)
	}
	if len(serials) < 3 {
		t.Errorf("saw %d serving certificates in 12s with a 3s lifetime; rotation did not happen", len(serials))
	}
	if len(cas) < 2 {
		t.Errorf("saw %d CAs in 12s with a 9s CA lifetime; CA rotation did not happen", len(cas))
	}
}
