package server

import (
	"fmt"
	"net/http"
	"slices"
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/meshlet/meshlet/webhook/registration"
)

// readyzChecks lists the checks /readyz?verbose reports ("[+]name ok").
func readyzChecks(body string) []string {
	var names []string
	for _, line := range strings.Split(body, "\n") {
		if len(line) > 3 && (strings.HasPrefix(line, "[+]") || strings.HasPrefix(line, "[-]")) {
			names = append(names, strings.Fields(line[3:])[0])
		}
	}
	slices.Sort(names)
	return names
}

// TestEnvtestReadinessChecks asks each readiness check of a ready webhook
// 1,000 times, and the aggregate /readyz 1,000 times: every answer is 200.
// Nothing changes in between, so any failure is a check that does not
// reflect the state it names (the namespace-cache check used to ask
// WaitForCacheSync with a cancelled context and fail about half the time).
func TestEnvtestReadinessChecks(t *testing.T) {
	c := startCluster(t, clusterOptions{})
	_, body, err := c.readyz("")
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"certificate-trusted", "namespace-cache", "webhook-server"}
	if got := readyzChecks(body); !slices.Equal(got, want) {
		t.Fatalf("/readyz checks %v, want %v:\n%s", got, want, body)
	}
	const rounds = 1000
	for _, check := range append(want, "") {
		var bad int
		var first string
		for range rounds {
			code, body, err := c.readyz(check)
			if err != nil || code != http.StatusOK {
				if bad++; first == "" {
					first = fmt.Sprint(code, " ", strings.TrimSpace(body), err)
				}
			}
		}
		name := check
		if name == "" {
			name = "(all)"
		}
		if bad > 0 {
			t.Errorf("readiness check %s: %d of %d probes failed on a ready webhook; first: %s", name, bad, rounds, first)
		}
	}
}

// TestEnvtestReadinessFollowsCABundle runs the webhook with the chart's
// permissions and changes them: readiness follows whether the API server
// trusts the serving certificate, and nothing else.
//   - The webhook may not read its Secret any more: reconcile rounds fail,
//     but the caBundle still trusts the certificate, so it stays ready.
//   - The caBundle is wiped and the webhook may not write it back: it is not
//     ready, and stays so while the caBundle is empty.
//   - The permission comes back: the webhook restores the caBundle and is
//     ready again.
func TestEnvtestReadinessFollowsCABundle(t *testing.T) {
	const user = "meshlet-webhook-test"
	c := startCluster(t, clusterOptions{asUser: user})
	ctx := t.Context()
	roles := c.kube.RbacV1().ClusterRoles()
	setRules := func(edit func(*[]string, string)) {
		t.Helper()
		role, err := roles.Get(ctx, etRole, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		role.Rules = webhookRules()
		for i := range role.Rules {
			edit(&role.Rules[i].Verbs, role.Rules[i].Resources[0])
		}
		if _, err := roles.Update(ctx, role, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	errorsTotal := func() float64 {
		t.Helper()
		mfs, err := c.srv.Registry.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == "meshlet_webhook_certificate_reconcile_errors_total" {
				return sumOf(mf.GetMetric())
			}
		}
		t.Fatal("no meshlet_webhook_certificate_reconcile_errors_total")
		return 0
	}

	t.Run("API errors alone do not make it not ready", func(t *testing.T) {
		before := errorsTotal()
		setRules(func(verbs *[]string, resource string) {
			if resource == "secrets" {
				*verbs = []string{"list"} // nothing the webhook uses
			}
		})
		eventually(t, "reconcile rounds failing", 10*time.Second, func() error {
			if errorsTotal() < before+3 {
				return fmt.Errorf("%v reconcile errors, want %v", errorsTotal(), before+3)
			}
			return nil
		})
		c.stayReady(t, time.Second)
		setRules(func(*[]string, string) {})
	})

	api := c.kube.AdmissionregistrationV1().MutatingWebhookConfigurations()
	bundleLen := func() int {
		t.Helper()
		cfg, err := api.Get(ctx, registration.DefaultName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return len(cfg.Webhooks[0].ClientConfig.CABundle)
	}
	wipe := func() {
		t.Helper()
		cfg, err := api.Get(ctx, registration.DefaultName, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for i := range cfg.Webhooks {
			cfg.Webhooks[i].ClientConfig.CABundle = nil
		}
		if _, err := api.Update(ctx, cfg, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("not ready while the caBundle is wiped", func(t *testing.T) {
		setRules(func(verbs *[]string, resource string) {
			if resource == "mutatingwebhookconfigurations" {
				*verbs = []string{"get"}
			}
		})
		// RBAC changes reach the authorizer within moments: until then the
		// webhook may still repair a wipe, so wipe again until it cannot.
		eventually(t, "readiness drops with an empty caBundle", 10*time.Second, func() error {
			if bundleLen() != 0 {
				wipe()
			}
			code, body, err := c.readyz("")
			if err != nil {
				return err
			}
			if code == http.StatusOK {
				return fmt.Errorf("still ready")
			}
			if !strings.Contains(body, "[-]certificate-trusted failed") {
				return fmt.Errorf("not ready for another reason: %s", body)
			}
			return nil
		})
		for end := time.Now().Add(time.Second); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
			if code, _, err := c.readyz(""); err == nil && code == http.StatusOK {
				t.Fatalf("ready again although the caBundle is still empty (%d bytes)", bundleLen())
			}
		}
		if n := bundleLen(); n != 0 {
			t.Fatalf("caBundle restored (%d bytes) without permission to write it", n)
		}
	})

	t.Run("ready again once the caBundle is restored", func(t *testing.T) {
		setRules(func(*[]string, string) {})
		c.waitReady(t)
		if bundleLen() == 0 {
			t.Fatal("ready with an empty caBundle")
		}
	})
}

func sumOf(ms []*dto.Metric) float64 {
	var v float64
	for _, m := range ms {
		v += m.GetCounter().GetValue()
	}
	return v
}
