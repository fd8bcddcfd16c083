package inject

import (
	"errors"
	"strings"
	"testing"
)

func TestDefaultConfigIsValid(t *testing.T) {
	c := DefaultConfig()
	if err := c.Validate(); err != nil {
		t.Fatalf("embedded defaults invalid: %v", err)
	}
	if c.Image != "meshlet/meshlet:0.1.0" || c.ImagePullPolicy != "IfNotPresent" || c.ProxyUID != 1337 {
		t.Fatalf("unexpected defaults: %+v", c)
	}
}

func TestLoadConfig(t *testing.T) {
	tests := []struct {
		name    string
		doc     string
		wantErr []string // substrings, all must appear
		check   func(t *testing.T, c Config)
	}{
		{name: "empty overlay keeps defaults", doc: "apiVersion: meshlet.io/v1alpha1\nkind: InjectionConfig\n",
			check: func(t *testing.T, c Config) {
				if c.Capture.ExcludeInboundPorts != "22" || c.TerminationDrainDuration != "5s" {
					t.Errorf("defaults lost: %+v", c)
				}
			}},
		{name: "overlay", doc: "apiVersion: meshlet.io/v1alpha1\nkind: InjectionConfig\nimage: r/m:1\nnativeSidecar: false\ncni: {enabled: true}\ncapture: {excludeInboundPorts: \"\"}\n",
			check: func(t *testing.T, c Config) {
				if c.Image != "r/m:1" || c.NativeSidecar != NativeSidecarFalse || !c.CNI.Enabled || c.Capture.ExcludeInboundPorts != "" || c.Capture.IncludeInboundPorts != "*" {
					t.Errorf("overlay wrong: %+v", c)
				}
			}},
		{name: "native sidecar as string", doc: "apiVersion: meshlet.io/v1alpha1\nkind: InjectionConfig\nnativeSidecar: \"true\"\n",
			check: func(t *testing.T, c Config) {
				if c.NativeSidecar != NativeSidecarTrue {
					t.Errorf("nativeSidecar = %q", c.NativeSidecar)
				}
			}},
		{name: "unknown field", doc: "apiVersion: meshlet.io/v1alpha1\nkind: InjectionConfig\nimgae: x\n", wantErr: []string{"imgae"}},
		{name: "wrong kind", doc: "apiVersion: v1\nkind: ConfigMap\n", wantErr: []string{`apiVersion="v1"`, `kind="ConfigMap"`}},
		{name: "all problems at once", doc: `apiVersion: meshlet.io/v1alpha1
kind: InjectionConfig
image: ""
imagePullPolicy: Sometimes
webhookNamespace: Not_A_Name
nativeSidecar: maybe
terminationDrainDuration: soon
proxyUID: -1
resources: {requests: {cpu: lots, memory: 2Gi}, limits: {memory: 1Gi}}
capture:
  interceptionMode: NAT
  includeInboundPorts: "80,99999"
  excludeInboundPorts: "ssh"
  includeOutboundIPRanges: "10.0.0.0/33"
  excludeOutboundIPRanges: "10.0.0.1/40"
  includeOutboundPorts: "0"
  excludeOutboundPorts: "-5"
  excludeInterfaces: "a/b"
`, wantErr: []string{
			`image=""`, `imagePullPolicy="Sometimes"`, `webhookNamespace="Not_A_Name"`, `nativeSidecar="maybe"`,
			`terminationDrainDuration="soon"`, `proxyUID="-1"`, `resources.requests.cpu="lots"`,
			`resources.requests.memory="2Gi": exceeds resources.limits.memory 1Gi`,
			`capture.interceptionMode="NAT"`, `capture.includeInboundPorts="80,99999"`, `capture.excludeInboundPorts="ssh"`,
			`capture.includeOutboundIPRanges="10.0.0.0/33"`, `capture.excludeOutboundIPRanges="10.0.0.1/40"`,
			`capture.includeOutboundPorts="0"`, `capture.excludeOutboundPorts="-5"`, `capture.excludeInterfaces="a/b"`,
		}},
		{name: "not yaml", doc: "a: [", wantErr: []string{"parsing injection config"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c, err := LoadConfig([]byte(tt.doc))
			if len(tt.wantErr) == 0 {
				if err != nil {
					t.Fatalf("LoadConfig: %v", err)
				}
				tt.check(t, c)
				return
			}
			if err == nil {
				t.Fatalf("LoadConfig succeeded, want errors %q", tt.wantErr)
			}
			for _, w := range tt.wantErr {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error lacks %q:\n%v", w, err)
				}
			}
			if len(tt.wantErr) > 2 {
				var fe *FieldError
				if !errors.As(err, &fe) {
					t.Errorf("error is not a *FieldError: %T", err)
				}
			}
		})
	}
}
