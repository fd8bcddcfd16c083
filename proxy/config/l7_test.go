package config

import (
	"slices"
	"strings"
	"testing"
)

const validConfig = `
ports:
- {port: 9080, name: http-web}
- {port: 7070, appProtocol: grpc}
- {port: 3306, name: tcp-mysql}
detection: {timeout: 1s}
services:
- name: reviews
  hosts: [reviews, "*.reviews.example"]
  addresses: [10.96.0.10, 10.97.0.0/16]
  ports: [{port: 9080}]
  routes:
  - name: r
    match: [{uri: {prefix: /a}, method: GET, headers: {x-user: {regex: "j.*"}}}]
    timeout: 2s
    retries: {attempts: 2, perTryTimeout: 500ms, retryOn: [5xx, connect-failure, "503"], budget: {ratio: 0.2, minPerSecond: 5}}
    fault: {delay: {fixed: 5ms, percent: 10}, abort: {httpStatus: 503, percent: 1}}
    mirror: {cluster: c, percent: 50}
    destinations: [{cluster: c, subset: v1, weight: 90}, {cluster: c, weight: 10}]
clusters:
- name: c
  loadBalancer: peak_ewma
  endpoints: [{address: "127.0.0.1:1", labels: {version: v1}}]
  dns: {name: reviews.default.svc.cluster.local, port: 9080, refresh: 10s}
  subsets: [{name: v1, labels: {version: v1}}]
  connectionPool: {maxConnections: 10, maxPendingRequests: 5, maxRequests: 100}
  outlierDetection: {consecutive5xx: 3, baseEjectionTime: 1s, maxEjectionPercent: 50}
  healthCheck: {path: /healthz, interval: 1s}
accessLog: {enabled: true, sampleRate: 0.5}
`

func TestLoadValid(t *testing.T) {
	t.Parallel()
	c, err := ParseL7([]byte(validConfig))
	if err != nil {
		t.Fatal(err)
	}
	if c.Services[0].Routes[0].Timeout.D.String() != "2s" || c.Clusters[0].DNS.Refresh.D.String() != "10s" {
		t.Fatalf("durations not parsed: %+v", c.Services[0].Routes[0].Timeout)
	}
	empty, err := ParseL7(nil)
	if err != nil || len(empty.Services) != 0 {
		t.Fatalf("empty config: %v", err)
	}
}

func TestLoadErrorsNameFieldAndValue(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name, yaml string
		want       []string // every substring must appear
	}{
		{"unknown field", "services: []\nbogus: 1\n", []string{`unknown field "bogus"`}},
		{"unknown nested field", "clusters: [{name: a, endpoints: [{address: '1.2.3.4:5'}], lb: x}]", []string{`unknown field "lb"`}},
		{"bad duration", "detection: {timeout: soon}", []string{"detection.timeout", `"soon"`}},
		{"detection timeout zero", "detection: {timeout: 0s}", []string{"detection.timeout", `"0s" must be within 1ms..1m`}},
		{"detection timeout long", "detection: {timeout: 2m}", []string{"detection.timeout", `"2m" must be within 1ms..1m`}},
		{"health check type", "clusters: [{name: a, endpoints: [{address: '1.2.3.4:5'}], healthCheck: {type: icmp}}]",
			[]string{"clusters[0].healthCheck.type", `"icmp"`, "http, tcp or grpc"}},
		{"grpc health check path", "clusters: [{name: a, endpoints: [{address: '1.2.3.4:5'}], healthCheck: {type: grpc, path: /healthz}}]",
			[]string{"clusters[0].healthCheck.path", `"/healthz"`, "only valid for type http"}},
		{"http health check serviceName", "clusters: [{name: a, endpoints: [{address: '1.2.3.4:5'}], healthCheck: {serviceName: echo}}]",
			[]string{"clusters[0].healthCheck.serviceName", `"echo"`, "only valid for type grpc"}},
		{"health check interval", "clusters: [{name: a, endpoints: [{address: '1.2.3.4:5'}], healthCheck: {type: grpc, interval: 0s, timeout: fast}}]",
			[]string{"clusters[0].healthCheck.interval", `"0s" must be positive`, "clusters[0].healthCheck.timeout", `"fast"`}},
		{"health check thresholds", "clusters: [{name: a, endpoints: [{address: '1.2.3.4:5'}], healthCheck: {type: grpc, healthyThreshold: -2}}]",
			[]string{"clusters[0].healthCheck.healthyThreshold", "-2"}},
		{"negative duration", "limits: {idleTimeout: -1s}", []string{"limits.idleTimeout", `"-1s"`}},
		{"bad port protocol", "ports: [{port: 80, protocol: quic}]", []string{"ports[0].protocol", `"quic"`}},
		{"dup port", "ports: [{port: 80}, {port: 80}]", []string{"ports[1].port", "80 declared twice"}},
		{"endpoint address", "clusters: [{name: a, endpoints: [{address: 'localhost:80'}]}]", []string{"clusters[0].endpoints[0].address", `"localhost:80"`}},
		{"lb", "clusters: [{name: a, loadBalancer: random, endpoints: [{address: '1.2.3.4:5'}]}]", []string{"clusters[0].loadBalancer", `"random"`}},
		{"no endpoints", "clusters: [{name: a}]", []string{"clusters[0]", `"a" needs endpoints or dns`}},
		{"unknown cluster", "services: [{name: s, hosts: [s], routes: [{name: r, destinations: [{cluster: nope}]}]}]",
			[]string{"services[0].routes[0].destinations[0].cluster", `"nope"`}},
		{"unknown subset", "clusters: [{name: a, endpoints: [{address: '1.2.3.4:5'}]}]\nservices: [{name: s, hosts: [s], routes: [{name: r, destinations: [{cluster: a, subset: v9}]}]}]",
			[]string{"services[0].routes[0].destinations[0].subset", `"v9"`}},
		{"bad regex", "clusters: [{name: a, endpoints: [{address: '1.2.3.4:5'}]}]\nservices: [{name: s, hosts: [s], routes: [{name: r, match: [{uri: {regex: '(['}}], destinations: [{cluster: a}]}]}]",
			[]string{"services[0].routes[0].match[0].uri.regex", `"(["`}},
		{"two matchers", "clusters: [{name: a, endpoints: [{address: '1.2.3.4:5'}]}]\nservices: [{name: s, hosts: [s], routes: [{name: r, match: [{uri: {exact: /a, prefix: /b}}], destinations: [{cluster: a}]}]}]",
			[]string{"services[0].routes[0].match[0].uri", "exactly one"}},
		{"fault percent", "clusters: [{name: a, endpoints: [{address: '1.2.3.4:5'}]}]\nservices: [{name: s, hosts: [s], routes: [{name: r, fault: {abort: {httpStatus: 503, percent: 150}}, destinations: [{cluster: a}]}]}]",
			[]string{"services[0].routes[0].fault.abort.percent", "150"}},
		{"grpc status", "clusters: [{name: a, endpoints: [{address: '1.2.3.4:5'}]}]\nservices: [{name: s, hosts: [s], routes: [{name: r, fault: {abort: {grpcStatus: 0, percent: 1}}, destinations: [{cluster: a}]}]}]",
			[]string{"services[0].routes[0].fault.abort.grpcStatus", "0"}},
		{"retry on", "clusters: [{name: a, endpoints: [{address: '1.2.3.4:5'}]}]\nservices: [{name: s, hosts: [s], routes: [{name: r, retries: {attempts: 2, retryOn: [sometimes]}, destinations: [{cluster: a}]}]}]",
			[]string{"services[0].routes[0].retries.retryOn[0]", `"sometimes"`}},
		{"bad host", "clusters: [{name: a, endpoints: [{address: '1.2.3.4:5'}]}]\nservices: [{name: s, hosts: ['a*b'], routes: [{name: r, destinations: [{cluster: a}]}]}]",
			[]string{"services[0].hosts[0]", `"a*b"`}},
		{"sample rate", "accessLog: {enabled: true, sampleRate: 2}", []string{"accessLog.sampleRate", "2"}},
		{"zero weights", "clusters: [{name: a, endpoints: [{address: '1.2.3.4:5'}]}]\nservices: [{name: s, hosts: [s], routes: [{name: r, destinations: [{cluster: a}, {cluster: a}]}]}]",
			[]string{"services[0].routes[0].destinations", "weights"}},
		{"all errors collected", "ports: [{port: 0}]\nclusters: [{name: ''}]", []string{"ports[0].port", "clusters[0].name"}},
		{"wrong type", "ports: [{port: http}]", []string{"port"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := ParseL7([]byte(tt.yaml))
			if err == nil {
				t.Fatalf("no error for %q", tt.yaml)
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not contain %q", err, w)
				}
			}
		})
	}
}

func TestPortProtocol(t *testing.T) {
	t.Parallel()
	tests := []struct {
		p    PortConfig
		want string
	}{
		{PortConfig{Name: "http-web"}, ProtoHTTP},
		{PortConfig{Name: "http2-x"}, ProtoHTTP2},
		{PortConfig{Name: "grpc-api"}, ProtoGRPC},
		{PortConfig{Name: "grpc-web-x"}, ProtoGRPC},
		{PortConfig{Name: "tcp-db"}, ProtoTCP},
		{PortConfig{Name: "http"}, ProtoHTTP},
		{PortConfig{Name: "web"}, ProtoAuto},
		{PortConfig{Name: "tcp-db", AppProtocol: "http"}, ProtoHTTP},
		{PortConfig{AppProtocol: "kubernetes.io/h2c"}, ProtoHTTP2},
		{PortConfig{AppProtocol: "kubernetes.io/ws"}, ProtoHTTP},
		{PortConfig{AppProtocol: "custom.example/x"}, ProtoTCP},
		{PortConfig{Name: "http-x", Protocol: "tcp"}, ProtoTCP},
	}
	for _, tt := range tests {
		if got, err := PortProtocol(tt.p); err != nil || got != tt.want {
			t.Errorf("PortProtocol(%+v) = %q, %v; want %q", tt.p, got, err, tt.want)
		}
	}
}

// TestConfigFiles: Files lists the TLS files of every cluster, sorted, each
// once (a CA shared by two clusters, a cluster without TLS, a TLS block
// without a CA).
func TestConfigFiles(t *testing.T) {
	t.Parallel()
	c := L7{Clusters: []Cluster{
		{Name: "b", TLS: &UpstreamTLS{Mode: TLSMutual, CACertificates: "/etc/certs/ca.pem", ClientCertificate: "/etc/certs/tls.crt", PrivateKey: "/etc/certs/tls.key"}},
		{Name: "plain"},
		{Name: "a", TLS: &UpstreamTLS{Mode: TLSSimple, CACertificates: "/etc/certs/ca.pem"}},
		{Name: "roots", TLS: &UpstreamTLS{Mode: TLSSimple}},
		{Name: "z", TLS: &UpstreamTLS{Mode: TLSSimple, CACertificates: "/etc/other/ca.pem"}},
	}}
	want := []string{"/etc/certs/ca.pem", "/etc/certs/tls.crt", "/etc/certs/tls.key", "/etc/other/ca.pem"}
	if got := c.Files(); !slices.Equal(got, want) {
		t.Errorf("Files() = %q, want %q", got, want)
	}
	if got := (&L7{}).Files(); len(got) != 0 {
		t.Errorf("Files() of an empty config = %q", got)
	}
}
