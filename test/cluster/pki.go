package cluster

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"time"
)

// keyPair is a certificate and its private key, PEM encoded.
type keyPair struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	// CertPEM and KeyPEM are what goes on disk and into kubeconfigs.
	CertPEM, KeyPEM []byte
}

// certSpec describes one certificate signed by a CA.
type certSpec struct {
	cn     string
	orgs   []string
	dns    []string
	ips    []net.IP
	server bool
	client bool
}

func newKey() (*ecdsa.PrivateKey, []byte, error) {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	der, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		return nil, nil, err
	}
	return k, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: der}), nil
}

func serial() *big.Int {
	n, _ := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	return n
}

func newCA(cn string) (*keyPair, error) {
	key, keyPEM, err := newKey()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().AddDate(10, 0, 0),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	cert, _ := x509.ParseCertificate(der)
	return &keyPair{cert: cert, key: key, KeyPEM: keyPEM,
		CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

// sign issues a certificate for s signed by kp (a CA).
func (kp *keyPair) sign(s certSpec) (*keyPair, error) {
	key, keyPEM, err := newKey()
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial(),
		Subject:      pkix.Name{CommonName: s.cn, Organization: s.orgs},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().AddDate(1, 0, 0),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		DNSNames:     s.dns,
		IPAddresses:  s.ips,
	}
	if s.server {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageServerAuth)
	}
	if s.client {
		tmpl.ExtKeyUsage = append(tmpl.ExtKeyUsage, x509.ExtKeyUsageClientAuth)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, kp.cert, &key.PublicKey, kp.key)
	if err != nil {
		return nil, err
	}
	return &keyPair{key: key, KeyPEM: keyPEM, CertPEM: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}, nil
}

func (kp *keyPair) write(dir, name string) error {
	if err := os.WriteFile(filepath.Join(dir, name+".crt"), kp.CertPEM, 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, name+".key"), kp.KeyPEM, 0o600)
}

// kubeconfig renders a kubeconfig for user authenticating with kp.
func kubeconfig(server string, ca []byte, user string, kp *keyPair) []byte {
	b64 := base64.StdEncoding.EncodeToString
	return []byte(fmt.Sprintf(`apiVersion: v1
kind: Config
clusters:
- name: mlk
  cluster:
    server: %s
    certificate-authority-data: %s
users:
- name: %s
  user:
    client-certificate-data: %s
    client-key-data: %s
contexts:
- name: mlk
  context:
    cluster: mlk
    user: %s
current-context: mlk
`, server, b64(ca), user, b64(kp.CertPEM), b64(kp.KeyPEM), user))
}

// writePKI creates the cluster's certificates and kubeconfigs in dir/pki
// once; an existing PKI (from an earlier up) is kept so clients stay valid.
func (c *Cluster) writePKI() error {
	dir := c.path("pki")
	if _, err := os.Stat(filepath.Join(dir, "done")); err == nil {
		return nil
	} else if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	ca, err := newCA("mlk-ca")
	if err != nil {
		return err
	}
	fp, err := newCA("mlk-front-proxy-ca")
	if err != nil {
		return err
	}
	nodeIP := net.ParseIP(NodeIP)
	type item struct {
		name string
		ca   *keyPair
		spec certSpec
		kube string // kubeconfig file name, if any
	}
	items := []item{
		{"apiserver", ca, certSpec{cn: "kube-apiserver", server: true,
			dns: []string{"kubernetes", "kubernetes.default", "kubernetes.default.svc", "kubernetes.default.svc.cluster.local", "localhost", NodeName},
			ips: []net.IP{net.ParseIP(APIServiceIP), nodeIP, net.ParseIP("127.0.0.1")}}, ""},
		{"apiserver-kubelet-client", ca, certSpec{cn: "kube-apiserver-kubelet-client", orgs: []string{"system:masters"}, client: true}, ""},
		{"kubelet-serving", ca, certSpec{cn: NodeName, dns: []string{NodeName}, ips: []net.IP{nodeIP}, server: true}, ""},
		{"front-proxy-client", fp, certSpec{cn: "front-proxy-client", client: true}, ""},
		{"admin", ca, certSpec{cn: "kubernetes-admin", orgs: []string{"system:masters"}, client: true}, "admin.kubeconfig"},
		{"kubelet", ca, certSpec{cn: "system:node:" + NodeName, orgs: []string{"system:nodes"}, client: true}, "kubelet.kubeconfig"},
		{"controller-manager", ca, certSpec{cn: "system:kube-controller-manager", client: true}, "controller-manager.kubeconfig"},
		{"scheduler", ca, certSpec{cn: "system:kube-scheduler", client: true}, "scheduler.kubeconfig"},
		{"kube-proxy", ca, certSpec{cn: "system:kube-proxy", client: true}, "kube-proxy.kubeconfig"},
	}
	if err := ca.write(dir, "ca"); err != nil {
		return err
	}
	if err := fp.write(dir, "front-proxy-ca"); err != nil {
		return err
	}
	for _, it := range items {
		kp, err := it.ca.sign(it.spec)
		if err != nil {
			return fmt.Errorf("signing %s: %w", it.name, err)
		}
		if err := kp.write(dir, it.name); err != nil {
			return err
		}
		if it.kube != "" {
			if err := os.WriteFile(filepath.Join(c.Dir, it.kube), kubeconfig("https://"+NodeIP+":6443", ca.CertPEM, it.name, kp), 0o600); err != nil {
				return err
			}
		}
	}
	// The service-account token signing key pair.
	sa, saPEM, err := newKey()
	if err != nil {
		return err
	}
	pub, err := x509.MarshalPKIXPublicKey(&sa.PublicKey)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "sa.key"), saPEM, 0o600); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "sa.pub"), pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}), 0o644); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "done"), nil, 0o644)
}
