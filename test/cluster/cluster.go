// Package cluster brings a real single-node Kubernetes v1.31 up and down on
// this machine for meshlet's e2e tests and `make demo`: etcd, kube-apiserver,
// kube-controller-manager, kube-scheduler, containerd + runc, kubelet,
// kube-proxy, CoreDNS and a bridge CNI network, all built from the Go module
// proxy (test/bin/build-k8s.sh) and Debian packages, with images imported from
// tarballs (package images) instead of pulled from a registry.
//
// Everything lives under one scratch folder (Config.Dir): certificates,
// kubeconfigs, configs, daemon state, logs and PID files. Up is idempotent (a
// running daemon is kept, a dead one restarted, config files rewritten only
// when their content changes); Down stops the daemons by PID and restores the
// host: bridges, routes, iptables chains, sysctls, cgroups, mounts and network
// namespaces the cluster created.
//
// The network never leaves the machine: the node IP sits on a bridge with no
// ports, the service CIDR is routed into it, and a FORWARD guard drops pod
// traffic not addressed to another pod.
package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// The cluster's addresses (the cluster engineer's 10.215–10.217 ranges).
const (
	NodeName      = "mlk-node"
	NodeBridge    = "mlk-node"   // port-less bridge holding the node IP
	PodBridge     = "mlk-cni0"   // the CNI bridge
	NodeIP        = "10.215.0.1" // node IP (/24 on NodeBridge)
	ServiceCIDR   = "10.216.0.0/16"
	APIServiceIP  = "10.216.0.1"
	ClusterCIDR   = "10.217.0.0/16"
	PodSubnet     = "10.217.0.0/24"
	PodGateway    = "10.217.0.1"
	DNSIP         = NodeIP // CoreDNS listens on the node IP
	etcdClientURL = "http://127.0.0.1:12379"
	etcdPeerURL   = "http://127.0.0.1:12380"
	guardChain    = "MLK-FORWARD"
	cniNetwork    = "mlk"
)

// Config says where the cluster lives and what it runs.
type Config struct {
	// Dir is the scratch folder holding all cluster state
	// (default $MESHLET_CLUSTER_DIR or /var/tmp/mlk-cluster).
	Dir string
	// RepoRoot is the meshlet source tree (for test/bin/build-k8s.sh).
	RepoRoot string
	// BinDir holds the Kubernetes binaries (default: build-k8s.sh --print-dir).
	BinDir string
	// Images are image tarballs imported into the node at every Up.
	Images []string
	// Log receives progress lines; nil discards them.
	Log io.Writer
}

// Cluster is a handle on the cluster in Config.Dir.
type Cluster struct {
	Config
	// Kubeconfig is the admin kubeconfig (system:masters).
	Kubeconfig string
	// CNIBinDir and CNIConfDir are the node's CNI folders (for meshlet's CNI mode).
	CNIBinDir, CNIConfDir string
	// ContainerdSocket is the node's containerd address.
	ContainerdSocket string
}

// New returns a handle for cfg with defaults filled in.
func New(cfg Config) (*Cluster, error) {
	if cfg.Dir == "" {
		cfg.Dir = os.Getenv("MESHLET_CLUSTER_DIR")
	}
	if cfg.Dir == "" {
		cfg.Dir = "/var/tmp/mlk-cluster"
	}
	if cfg.Log == nil {
		cfg.Log = io.Discard
	}
	if cfg.RepoRoot == "" {
		cfg.RepoRoot = "."
	}
	var err error
	if cfg.RepoRoot, err = filepath.Abs(cfg.RepoRoot); err != nil {
		return nil, err
	}
	if cfg.BinDir == "" {
		out, err := exec.Command(filepath.Join(cfg.RepoRoot, "test/bin/build-k8s.sh"), "--print-dir").Output()
		if err != nil {
			return nil, fmt.Errorf("test/bin/build-k8s.sh --print-dir: %w", err)
		}
		cfg.BinDir = strings.TrimSpace(string(out))
	}
	c := &Cluster{Config: cfg}
	c.Kubeconfig = c.path("admin.kubeconfig")
	c.CNIBinDir = c.path("cni/bin")
	c.CNIConfDir = c.path("cni/net.d")
	c.ContainerdSocket = c.path("containerd/containerd.sock")
	return c, nil
}

func (c *Cluster) path(p ...string) string { return filepath.Join(append([]string{c.Dir}, p...)...) }

func (c *Cluster) logf(format string, args ...any) {
	fmt.Fprintf(c.Log, "cluster: "+format+"\n", args...)
}

// Binaries the cluster runs from BinDir.
var Binaries = []string{"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubelet", "kube-proxy", "kubectl", "helm", "coredns"}

// EnsureBinaries builds missing Kubernetes binaries with test/bin/build-k8s.sh.
func (c *Cluster) EnsureBinaries(ctx context.Context) error {
	for _, b := range Binaries {
		if _, err := os.Stat(filepath.Join(c.BinDir, b)); err != nil {
			c.logf("building Kubernetes binaries (test/bin/build-k8s.sh all; ~6 min with empty caches)")
			return run(ctx, c.Log, filepath.Join(c.RepoRoot, "test/bin/build-k8s.sh"), "all")
		}
	}
	return nil
}

// Up starts (or completes) the cluster and waits until the node is Ready,
// CoreDNS answers and the default ServiceAccount exists. It imports the
// configured image tarballs every time, so pods see freshly built images.
func (c *Cluster) Up(ctx context.Context) error {
	if os.Geteuid() != 0 {
		return errors.New("the cluster needs root (bridges, iptables, containerd, kubelet)")
	}
	start := time.Now()
	if err := c.EnsureBinaries(ctx); err != nil {
		return err
	}
	for _, d := range []string{"logs", "pids", "etcd", "containerd", "kubelet", "pod-logs", "cni/bin", "cni/net.d", "cni/ipam", "config"} {
		if err := os.MkdirAll(c.path(d), 0o755); err != nil {
			return err
		}
	}
	if err := c.saveHostState(); err != nil {
		return err
	}
	if err := c.writePKI(); err != nil {
		return fmt.Errorf("writing certificates: %w", err)
	}
	if err := c.setupNetwork(ctx); err != nil {
		return fmt.Errorf("setting up the node network: %w", err)
	}
	if err := c.writeConfigs(); err != nil {
		return err
	}
	pki := c.path("pki")
	p := func(n string) string { return filepath.Join(pki, n) }
	steps := []struct {
		name  string
		args  []string
		ready func(context.Context) error
	}{
		{"etcd", []string{"--name=mlk", "--data-dir=" + c.path("etcd"),
			"--listen-client-urls=" + etcdClientURL, "--advertise-client-urls=" + etcdClientURL,
			"--listen-peer-urls=" + etcdPeerURL, "--initial-advertise-peer-urls=" + etcdPeerURL,
			"--initial-cluster=mlk=" + etcdPeerURL, "--listen-metrics-urls=", "--log-level=warn",
			"--quota-backend-bytes=2147483648", "--unsafe-no-fsync"},
			func(ctx context.Context) error { return httpOK(ctx, etcdClientURL+"/health") }},
		{"kube-apiserver", []string{"--advertise-address=" + NodeIP, "--bind-address=" + NodeIP, "--secure-port=6443",
			"--etcd-servers=" + etcdClientURL, "--service-cluster-ip-range=" + ServiceCIDR,
			"--client-ca-file=" + p("ca.crt"), "--tls-cert-file=" + p("apiserver.crt"), "--tls-private-key-file=" + p("apiserver.key"),
			"--kubelet-client-certificate=" + p("apiserver-kubelet-client.crt"), "--kubelet-client-key=" + p("apiserver-kubelet-client.key"),
			"--kubelet-certificate-authority=" + p("ca.crt"), "--kubelet-preferred-address-types=InternalIP",
			"--service-account-issuer=https://kubernetes.default.svc.cluster.local",
			"--service-account-key-file=" + p("sa.pub"), "--service-account-signing-key-file=" + p("sa.key"),
			"--authorization-mode=Node,RBAC",
			"--enable-admission-plugins=NodeRestriction,MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
			"--allow-privileged=true", "--enable-aggregator-routing=true",
			"--requestheader-client-ca-file=" + p("front-proxy-ca.crt"), "--requestheader-allowed-names=front-proxy-client",
			"--requestheader-extra-headers-prefix=X-Remote-Extra-", "--requestheader-group-headers=X-Remote-Group",
			"--requestheader-username-headers=X-Remote-User",
			"--proxy-client-cert-file=" + p("front-proxy-client.crt"), "--proxy-client-key-file=" + p("front-proxy-client.key"),
			"--profiling=false", "--v=0"},
			c.apiReady},
		{"kube-controller-manager", []string{"--kubeconfig=" + c.path("controller-manager.kubeconfig"),
			"--secure-port=0", "--leader-elect=false", "--use-service-account-credentials=true",
			"--cluster-signing-cert-file=" + p("ca.crt"), "--cluster-signing-key-file=" + p("ca.key"),
			"--root-ca-file=" + p("ca.crt"), "--service-account-private-key-file=" + p("sa.key"),
			"--allocate-node-cidrs=true", "--cluster-cidr=" + ClusterCIDR, "--node-cidr-mask-size=24",
			"--service-cluster-ip-range=" + ServiceCIDR, "--v=0"}, nil},
		{"kube-scheduler", []string{"--kubeconfig=" + c.path("scheduler.kubeconfig"), "--secure-port=0", "--leader-elect=false", "--v=0"}, nil},
		{"containerd", []string{"--config=" + c.path("config/containerd.toml")},
			func(ctx context.Context) error { return c.ctr(ctx, io.Discard, "version") }},
		{"kubelet", []string{"--config=" + c.path("config/kubelet.yaml"), "--kubeconfig=" + c.path("kubelet.kubeconfig"),
			"--hostname-override=" + NodeName, "--node-ip=" + NodeIP, "--root-dir=" + c.path("kubelet"), "--v=0"},
			func(ctx context.Context) error { return httpOK(ctx, "http://127.0.0.1:10248/healthz") }},
		{"kube-proxy", []string{"--config=" + c.path("config/kube-proxy.yaml"), "--v=0"},
			func(ctx context.Context) error { return httpOK(ctx, "http://127.0.0.1:10256/healthz") }},
		{"coredns", []string{"-conf=" + c.path("config/Corefile")}, nil},
	}
	for _, s := range steps {
		if s.name == "kubelet" {
			// The pause image must be in the node before the first sandbox.
			if err := c.ImportImages(ctx); err != nil {
				return err
			}
		}
		started, err := c.ensureDaemon(s.name, s.args)
		if err != nil {
			return err
		}
		if s.ready != nil {
			if err := waitFor(ctx, 90*time.Second, s.name+" ready", s.ready); err != nil {
				return fmt.Errorf("%w\n%s", err, c.tailLog(s.name, 30))
			}
		}
		if started {
			c.logf("%s started", s.name)
		}
	}
	if err := c.waitReady(ctx); err != nil {
		return err
	}
	c.logf("up in %s (kubeconfig %s)", time.Since(start).Round(100*time.Millisecond), c.Kubeconfig)
	return nil
}

// Client returns a client-go clientset for the admin user.
func (c *Cluster) Client() (*kubernetes.Clientset, *rest.Config, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", c.Kubeconfig)
	if err != nil {
		return nil, nil, err
	}
	cfg.QPS, cfg.Burst = 50, 100
	cs, err := kubernetes.NewForConfig(cfg)
	return cs, cfg, err
}

func (c *Cluster) apiReady(ctx context.Context) error {
	cs, _, err := c.Client()
	if err != nil {
		return err
	}
	body, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
	if err != nil {
		return fmt.Errorf("%w: %s", err, body)
	}
	return nil
}

// waitReady waits for the node to be Ready, the default ServiceAccount to
// exist and CoreDNS to answer.
func (c *Cluster) waitReady(ctx context.Context) error {
	cs, _, err := c.Client()
	if err != nil {
		return err
	}
	if err := waitFor(ctx, 120*time.Second, "node "+NodeName+" Ready", func(ctx context.Context) error {
		n, err := cs.CoreV1().Nodes().Get(ctx, NodeName, metav1.GetOptions{})
		if err != nil {
			return err
		}
		for _, cond := range n.Status.Conditions {
			if cond.Type == corev1.NodeReady {
				if cond.Status == corev1.ConditionTrue {
					return nil
				}
				return fmt.Errorf("%s: %s", cond.Reason, cond.Message)
			}
		}
		return errors.New("no Ready condition yet")
	}); err != nil {
		return fmt.Errorf("%w\n%s", err, c.tailLog("kubelet", 30))
	}
	if err := waitFor(ctx, 60*time.Second, "default ServiceAccount", func(ctx context.Context) error {
		_, err := cs.CoreV1().ServiceAccounts("default").Get(ctx, "default", metav1.GetOptions{})
		return err
	}); err != nil {
		return err
	}
	return waitFor(ctx, 30*time.Second, "CoreDNS", func(ctx context.Context) error {
		return c.dnsProbe(ctx)
	})
}

// ImportImages loads the configured image tarballs into containerd's k8s.io
// namespace.
func (c *Cluster) ImportImages(ctx context.Context) error {
	for _, img := range c.Images {
		if err := c.ctr(ctx, io.Discard, "images", "import", img); err != nil {
			return fmt.Errorf("importing %s: %w", img, err)
		}
	}
	if len(c.Images) > 0 {
		c.logf("imported %d images", len(c.Images))
	}
	return nil
}

// ctr runs ctr against the node's containerd in the k8s.io namespace.
func (c *Cluster) ctr(ctx context.Context, out io.Writer, args ...string) error {
	return runOut(ctx, out, "ctr", append([]string{"--address", c.ContainerdSocket, "--namespace", "k8s.io"}, args...)...)
}

// Kubectl runs the cluster's kubectl with the admin kubeconfig.
func (c *Cluster) Kubectl(ctx context.Context, stdin []byte, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(c.BinDir, "kubectl"), append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	cmd.Dir = c.RepoRoot
	if stdin != nil {
		cmd.Stdin = bytes.NewReader(stdin)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, &RunError{Args: cmd.Args, Output: append(out, stderr.Bytes()...), Err: err}
	}
	return out, nil
}

// Helm runs the cluster's helm with the admin kubeconfig.
func (c *Cluster) Helm(ctx context.Context, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, filepath.Join(c.BinDir, "helm"), append([]string{"--kubeconfig", c.Kubeconfig}, args...)...)
	cmd.Dir = c.RepoRoot
	cmd.Env = append(os.Environ(), "HELM_CACHE_HOME="+c.path("helm/cache"), "HELM_CONFIG_HOME="+c.path("helm/config"), "HELM_DATA_HOME="+c.path("helm/data"))
	out, err := cmd.CombinedOutput()
	if err != nil {
		return out, &RunError{Args: cmd.Args, Output: out, Err: err}
	}
	return out, nil
}

// RunError is an external command that failed, with its command line and output.
type RunError struct {
	Args   []string
	Output []byte
	Err    error
}

func (e *RunError) Error() string {
	return fmt.Sprintf("%s: %v\n%s", strings.Join(e.Args, " "), e.Err, bytes.TrimSpace(e.Output))
}

func (e *RunError) Unwrap() error { return e.Err }

func run(ctx context.Context, log io.Writer, name string, args ...string) error {
	return runOut(ctx, log, name, args...)
}

func runOut(ctx context.Context, out io.Writer, name string, args ...string) error {
	cmd := exec.CommandContext(ctx, name, args...)
	var buf bytes.Buffer
	cmd.Stdout = io.MultiWriter(out, &buf)
	cmd.Stderr = &buf
	if err := cmd.Run(); err != nil {
		return &RunError{Args: cmd.Args, Output: buf.Bytes(), Err: err}
	}
	return nil
}

func httpOK(ctx context.Context, url string) error {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	return nil
}

// waitFor polls check until it succeeds or timeout passes.
func waitFor(ctx context.Context, timeout time.Duration, what string, check func(context.Context) error) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last error
	for {
		cctx, ccancel := context.WithTimeout(ctx, 5*time.Second)
		last = check(cctx)
		ccancel()
		if last == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s (%s): %w", what, timeout, last)
		case <-time.After(300 * time.Millisecond):
		}
	}
}

// WaitFor polls check until it succeeds or timeout passes (for tests).
func WaitFor(ctx context.Context, timeout time.Duration, what string, check func(context.Context) error) error {
	return waitFor(ctx, timeout, what, check)
}

// writeIfChanged writes b to p only when the content differs: kube-proxy
// exits when its config file is rewritten.
func writeIfChanged(p string, b []byte) error {
	if old, err := os.ReadFile(p); err == nil && bytes.Equal(old, b) {
		return nil
	}
	return os.WriteFile(p, b, 0o644)
}

// ensureDaemon starts name with args unless the process in its PID file is
// alive and runs the same binary. It reports whether it started one.
func (c *Cluster) ensureDaemon(name string, args []string) (bool, error) {
	bin := c.binary(name)
	if pid, ok := c.daemonPID(name); ok {
		_ = pid
		return false, nil
	}
	logf, err := os.OpenFile(c.path("logs", name+".log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return false, err
	}
	defer logf.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = c.Dir
	// Own session: the daemons outlive the test binary or `make demo` and
	// are stopped by PID on Down.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Env = append(os.Environ(), "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	if err := cmd.Start(); err != nil {
		return false, fmt.Errorf("starting %s: %w", name, err)
	}
	go func() { _ = cmd.Wait() }() // reap it if it dies while we live
	return true, os.WriteFile(c.path("pids", name+".pid"), []byte(strconv.Itoa(cmd.Process.Pid)), 0o644)
}

func (c *Cluster) binary(name string) string {
	switch name {
	case "containerd":
		return "/usr/bin/containerd"
	}
	return filepath.Join(c.BinDir, name)
}

// daemonPID returns the live PID of name from its PID file, checking that
// the process still runs the binary (PIDs are reused).
func (c *Cluster) daemonPID(name string) (int, bool) {
	b, err := os.ReadFile(c.path("pids", name+".pid"))
	if err != nil {
		return 0, false
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return 0, false
	}
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	if err != nil || strings.TrimSuffix(exe, " (deleted)") != c.binary(name) {
		return 0, false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err == nil {
		if f := strings.Fields(string(stat[bytes.LastIndexByte(stat, ')')+1:])); len(f) > 0 && f[0] == "Z" {
			return 0, false
		}
	}
	return pid, true
}

// stopDaemon sends SIGTERM to name's process, then SIGKILL after grace.
func (c *Cluster) stopDaemon(name string, grace time.Duration) {
	pid, ok := c.daemonPID(name)
	if !ok {
		_ = os.Remove(c.path("pids", name+".pid"))
		return
	}
	_ = syscall.Kill(pid, syscall.SIGTERM)
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) {
		if _, ok := c.daemonPID(name); !ok {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if _, ok := c.daemonPID(name); ok {
		_ = syscall.Kill(pid, syscall.SIGKILL)
		for i := 0; i < 50; i++ {
			if _, ok := c.daemonPID(name); !ok {
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	_ = os.Remove(c.path("pids", name+".pid"))
	c.logf("%s stopped (pid %d)", name, pid)
}

func (c *Cluster) tailLog(name string, n int) string {
	b, _ := os.ReadFile(c.path("logs", name+".log"))
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return "--- last lines of " + c.path("logs", name+".log") + ":\n" + strings.Join(lines, "\n")
}

// Running reports whether the API server of this cluster answers.
func (c *Cluster) Running(ctx context.Context) bool {
	if _, err := os.Stat(c.Kubeconfig); err != nil {
		return false
	}
	return c.apiReady(ctx) == nil
}

// DeleteNamespace deletes ns and waits until it is gone.
func (c *Cluster) DeleteNamespace(ctx context.Context, ns string) error {
	cs, _, err := c.Client()
	if err != nil {
		return err
	}
	if err := cs.CoreV1().Namespaces().Delete(ctx, ns, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return err
	}
	return waitFor(ctx, 120*time.Second, "namespace "+ns+" deleted", func(ctx context.Context) error {
		_, err := cs.CoreV1().Namespaces().Get(ctx, ns, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			return nil
		}
		if err == nil {
			return errors.New("still there")
		}
		return err
	})
}
