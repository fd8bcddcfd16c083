package cluster

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// writeConfigs renders every daemon's config file into Dir/config (only
// when the content changes) and copies the CNI plugins into the node's CNI
// bin folder, which meshlet's CNI installer may write to.
func (c *Cluster) writeConfigs() error {
	pki := c.path("pki")
	files := map[string]string{
		"config/containerd.toml": fmt.Sprintf(`version = 2
root = %q
state = %q
[grpc]
  address = %q
[ttrpc]
  address = %q
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "docker.io/meshlet/pause:0.1.0"
  restrict_oom_score_adj = true
  disable_apparmor = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
`, c.path("containerd/root"), c.path("containerd/state"), c.ContainerdSocket, c.ContainerdSocket+".ttrpc",
			c.path("containerd/opt"), c.CNIBinDir, c.CNIConfDir),

		"config/kubelet.yaml": fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: %s
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: false}
  x509: {clientCAFile: %s}
authorization: {mode: AlwaysAllow}
tlsCertFile: %s
tlsPrivateKeyFile: %s
cgroupDriver: cgroupfs
failSwapOn: false
oomScoreAdj: 0
clusterDNS: [%s]
clusterDomain: cluster.local
resolvConf: %s
containerRuntimeEndpoint: unix://%s
podLogsDir: %s
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%%, nodefs.inodesFree: 1%%, imagefs.available: 1%%}
serializeImagePulls: false
syncFrequency: 10s
protectKernelDefaults: false
makeIPTablesUtilChains: false
localStorageCapacityIsolation: false
`, NodeIP, filepath.Join(pki, "ca.crt"), filepath.Join(pki, "kubelet-serving.crt"), filepath.Join(pki, "kubelet-serving.key"),
			DNSIP, c.path("config/resolv.conf"), c.ContainerdSocket, c.path("pod-logs")),

		"config/kube-proxy.yaml": fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %s}
hostnameOverride: %s
bindAddress: %s
mode: iptables
clusterCIDR: %s
oomScoreAdj: 0
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
iptables: {localhostNodePorts: false}
nodePortAddresses: [%s/32]
metricsBindAddress: 127.0.0.1:10249
healthzBindAddress: 127.0.0.1:10256
`, c.path("kube-proxy.kubeconfig"), NodeName, NodeIP, ClusterCIDR, NodeIP),

		// No forward plugin: nothing outside the cluster resolves.
		"config/Corefile": fmt.Sprintf(`.:53 {
    bind %s
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig %s
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
}
`, DNSIP, c.Kubeconfig),

		"config/resolv.conf": "# pods resolve through CoreDNS only (clusterDNS); nothing outside the cluster\n",

		"cni/net.d/10-mlk.conflist": fmt.Sprintf(`{
  "cniVersion": "1.0.0",
  "name": %q,
  "plugins": [
    {
      "type": "bridge",
      "bridge": %q,
      "isGateway": true,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": %q,
        "ranges": [[{"subnet": %q, "gateway": %q}]],
        "routes": [{"dst": "0.0.0.0/0"}]
      }
    },
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ]
}
`, cniNetwork, PodBridge, c.path("cni/ipam"), PodSubnet, PodGateway),
	}
	for name, content := range files {
		if err := writeIfChanged(c.path(name), []byte(content)); err != nil {
			return err
		}
	}
	for _, plugin := range []string{"bridge", "host-local", "loopback", "portmap"} {
		dst := filepath.Join(c.CNIBinDir, plugin)
		if _, err := os.Stat(dst); err == nil {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/usr/lib/cni", plugin))
		if err != nil {
			return fmt.Errorf("CNI plugin %s (Debian package containernetworking-plugins): %w", plugin, err)
		}
		if err := os.WriteFile(dst, b, 0o755); err != nil {
			return err
		}
	}
	return nil
}

// dnsProbe asks CoreDNS for the API server's Service name.
func (c *Cluster) dnsProbe(ctx context.Context) error {
	r := &net.Resolver{PreferGo: true, Dial: func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, net.JoinHostPort(DNSIP, "53"))
	}}
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	addrs, err := r.LookupHost(ctx, "kubernetes.default.svc.cluster.local")
	if err != nil {
		return err
	}
	if strings.Join(addrs, ",") != APIServiceIP {
		return fmt.Errorf("kubernetes.default.svc resolves to %v, want %s", addrs, APIServiceIP)
	}
	return nil
}
