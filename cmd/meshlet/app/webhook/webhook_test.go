package webhook

import (
	"bytes"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/client-go/rest"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/webhook/server"
)

func testEnv(vars map[string]string) env {
	return env{
		getenv:     func(k string) string { return vars[k] },
		restConfig: func(string) (*rest.Config, error) { return &rest.Config{Host: "https://127.0.0.1:1"}, nil },
	}
}

// parse runs the command's flag parsing and validation without serving.
func parse(t *testing.T, e env, args ...string) (server.Config, error) {
	t.Helper()
	var out bytes.Buffer
	cmd, f := newCommand(cli.Streams{In: strings.NewReader(""), Out: &out, Err: &out}, e)
	if err := cmd.ParseFlags(args); err != nil {
		return server.Config{}, err
	}
	return f.config(e, logr.Discard())
}

func TestFlagsDefaults(t *testing.T) {
	t.Parallel()
	cfg, err := parse(t, testEnv(map[string]string{"POD_NAMESPACE": "meshlet-system"}))
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Validate(); err != nil {
		t.Fatalf("defaults do not validate: %v", err)
	}
	want := server.Config{Port: 15017, Path: "/inject", Namespace: "meshlet-system", ServiceName: "meshlet-webhook",
		SecretName: "meshlet-webhook-certs", CertMode: server.CertModeSelf, MetricsAddr: ":15014", HealthAddr: ":8080",
		CertInterval: 10 * time.Second, ConfigPollInterval: 5 * time.Second}
	if cfg.Port != want.Port || cfg.Path != want.Path || cfg.Namespace != want.Namespace || cfg.ServiceName != want.ServiceName ||
		cfg.SecretName != want.SecretName || cfg.CertMode != want.CertMode || cfg.MetricsAddr != want.MetricsAddr ||
		cfg.HealthAddr != want.HealthAddr || cfg.CertInterval != want.CertInterval || cfg.ConfigPollInterval != want.ConfigPollInterval {
		t.Errorf("defaults = %+v", cfg)
	}
	if len(cfg.WebhookConfigNames) != 1 || cfg.WebhookConfigNames[0] != "meshlet-sidecar-injector" {
		t.Errorf("webhook config names %v", cfg.WebhookConfigNames)
	}
	if got := cfg.DNSNames()[0]; got != "meshlet-webhook.meshlet-system.svc" {
		t.Errorf("first DNS name %q", got)
	}
}

func TestFlagsErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		env  map[string]string
		args []string
		want []string // every one must appear
	}{
		{"no namespace", nil, nil, []string{`namespace: invalid value ""`}},
		{"flag wins over env", map[string]string{"POD_NAMESPACE": "a"}, []string{"--namespace=b", "--port=70000"}, []string{"port: invalid value 70000"}},
		{"all errors at once", map[string]string{"POD_NAMESPACE": "a"},
			[]string{"--cert-mode=vault", "--native-sidecar=maybe", "--extra-ip=10.0.0", "--path=inject", "--webhook-config-name=", "--cert-validity=-1s", "--config-poll-interval=-2s"},
			[]string{`cert-mode: invalid value "vault"`, `native-sidecar: invalid value "maybe"`, "extra-ip: invalid value 10.0.0", `path: invalid value "inject"`,
				"webhook-config-name", "cert-validity: invalid value -1s", "config-poll-interval: invalid value -2s"}},
		{"cert-manager needs a dir", map[string]string{"POD_NAMESPACE": "a"}, []string{"--cert-mode=cert-manager", "--cert-dir="}, []string{`cert-dir: invalid value ""`}},
		{"cert outlives CA", map[string]string{"POD_NAMESPACE": "a"}, []string{"--cert-validity=48h", "--ca-validity=24h"}, []string{"cert-validity: invalid value 48h0m0s: longer than ca-validity 24h0m0s"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := parse(t, testEnv(tt.env), tt.args...)
			if err == nil {
				t.Fatal("want an error")
			}
			for _, w := range tt.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not name %q", err, w)
				}
			}
			// Bad flags are a usage error: exit status 2, as for the agent and proxy.
			if ee := (*cli.ExitError)(nil); !errors.As(err, &ee) || ee.Code != 2 {
				t.Errorf("error %v is not an exit status 2", err)
			}
		})
	}
}

func TestKubeconfigError(t *testing.T) {
	t.Parallel()
	e := testEnv(map[string]string{"POD_NAMESPACE": "a"})
	e.restConfig = func(string) (*rest.Config, error) { return nil, errors.New("no such file") }
	_, err := parse(t, e, "--kubeconfig=/nope")
	if err == nil || !strings.Contains(err.Error(), `--kubeconfig="/nope"`) {
		t.Fatalf("err = %v, want it to name --kubeconfig", err)
	}
}
