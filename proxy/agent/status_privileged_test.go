package agent_test

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/agent"
)

type dialFunc func(ctx context.Context, network, addr string) (net.Conn, error)

// status calls the agent's status port on host with method and path, over a
// connection made by dial (from the client namespace or from inside the pod),
// and returns the status code and the whole body.
func (l *podLab) status(t *testing.T, dial dialFunc, method, host, path string) (int, string) {
	t.Helper()
	req, err := http.NewRequestWithContext(t.Context(), method, "http://"+net.JoinHostPort(host, "15020")+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{DialContext: dial, DisableKeepAlives: true}}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatalf("%s %s from %s: %v", method, path, host, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatalf("%s %s: reading the body: %v", method, path, err)
	}
	return resp.StatusCode, string(b)
}

// info reads /server_info from inside the pod.
func (l *podLab) info(t *testing.T) agent.Info {
	t.Helper()
	code, body := l.status(t, l.podDial, http.MethodGet, "127.0.0.1", "/server_info")
	if code != http.StatusOK {
		t.Fatalf("/server_info from loopback: %d %s", code, body)
	}
	var in agent.Info
	if err := json.Unmarshal([]byte(body), &in); err != nil {
		t.Fatalf("/server_info: %v\n%s", err, body)
	}
	return in
}

// alive fails the test if the agent has exited.
func (l *podLab) alive(t *testing.T) {
	t.Helper()
	select {
	case err := <-l.agentExited:
		l.agentExited <- err // for the cleanup
		t.Fatalf("the agent exited (%v)", err)
	default:
	}
}

// sameState compares what a refused call must not have changed.
func sameState(t *testing.T, before, after agent.Info) {
	t.Helper()
	pids := func(in agent.Info) []int {
		var p []int
		for _, g := range in.Generations {
			p = append(p, g.PID)
		}
		return p
	}
	if after.ActiveGeneration != before.ActiveGeneration || len(after.Generations) != len(before.Generations) ||
		!slices.Equal(pids(after), pids(before)) || after.State != before.State || after.Ready != before.Ready ||
		after.Restarts != before.Restarts {
		t.Errorf("refused calls changed the agent:\nbefore %+v\nafter  %+v", before, after)
	}
}

var lifecycleCalls = []struct{ method, path string }{
	{http.MethodPost, "/quitquitquit"}, {http.MethodPost, "/drain"}, {http.MethodPost, "/reload"},
}

// TestPrivilegedStatusLifecycleFromPodOnly: from another network namespace
// (any pod of the cluster), every state-changing POST to the sidecar's 15020
// and /server_info get 403 with the reason, over IPv4 and IPv6, and change
// nothing: same generations and PIDs, still ready, the agent alive. So does a
// call from inside the pod to the pod's own IP (not a loopback source). The
// kubelet-style probe and the metrics stay reachable from outside; refusals
// are counted and logged. From loopback inside the pod every call works.
func TestPrivilegedStatusLifecycleFromPodOnly(t *testing.T) {
	l := newPodLab(t, 7)
	before := l.info(t)
	if !before.Ready || before.ActiveGeneration == 0 {
		t.Fatalf("agent not serving before the test: %+v", before)
	}
	refused := map[string]int{}
	check := func(dial dialFunc, from, host, method, path string) {
		t.Helper()
		code, body := l.status(t, dial, method, host, path)
		if code != http.StatusForbidden || !strings.Contains(body, "only served to callers inside the pod") {
			t.Errorf("%s %s from %s to %s: %d %q, want 403 saying why", method, path, from, host, code, body)
		}
		refused[path]++
	}
	for _, host := range []string{l.podIP, l.podIP6} {
		for _, c := range lifecycleCalls {
			check(l.clientDial, "another netns", host, c.method, c.path)
		}
		check(l.clientDial, "another netns", host, http.MethodGet, "/server_info")
	}
	check(l.podDial, "the pod itself", l.podIP, http.MethodPost, "/quitquitquit")
	check(l.podDial, "the pod itself", l.podIP, http.MethodPost, "/drain")

	time.Sleep(500 * time.Millisecond) // an accepted /quitquitquit or /reload would act within this
	l.alive(t)
	sameState(t, before, l.info(t))

	// What the kubelet and scrapers use still answers the network.
	for _, u := range []string{"http://" + l.podIP + ":15020/healthz/ready", "http://" + l.podIP + ":15021/healthz/ready"} {
		if code, body := l.get(t, u); code != http.StatusOK {
			t.Errorf("readiness probe %s from outside: %d %s", u, code, body)
		}
	}
	code, metrics := l.status(t, l.clientDial, http.MethodGet, l.podIP, "/stats/prometheus")
	if code != http.StatusOK {
		t.Fatalf("/stats/prometheus from outside: %d", code)
	}
	for path, n := range refused {
		want := `meshlet_agent_status_denied_total{path="` + path + `"} ` + strconv.Itoa(n) + "\n"
		if !strings.Contains(metrics, want) {
			t.Errorf("metrics lack %q", strings.TrimSpace(want))
		}
	}
	if !strings.Contains(l.agentOut.String(), "Refused status call from outside the pod") {
		t.Error("refusals not logged")
	}

	// From inside the pod, over loopback, each works.
	if r := l.reload(t); strings.Contains(r, "error") {
		t.Fatalf("POST /reload from loopback: %s", r)
	}
	if got := l.info(t).ActiveGeneration; got != before.ActiveGeneration+1 {
		t.Errorf("after POST /reload from loopback the active generation is %d, want %d", got, before.ActiveGeneration+1)
	}
	if code, body := l.status(t, l.podDial, http.MethodPost, "::1", "/drain"); code != http.StatusOK {
		t.Fatalf("POST /drain from [::1]: %d %s", code, body)
	}
	eventuallyTrue(t, 5*time.Second, "not ready after /drain", func() bool {
		code, _ := l.get(t, "http://"+l.podIP+":15020/healthz/ready")
		return code == http.StatusServiceUnavailable
	})
	if code, body := l.status(t, l.podDial, http.MethodPost, "127.0.0.1", "/quitquitquit"); code != http.StatusOK {
		t.Fatalf("POST /quitquitquit from 127.0.0.1: %d %s", code, body)
	}
	select {
	case err := <-l.agentExited:
		l.agentExited <- err
		if err != nil {
			t.Errorf("agent exit after /quitquitquit: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("agent still running 10s after /quitquitquit from loopback")
	}
}

// TestPrivilegedStatusRemoteLifecycleOptIn: with --allow-remote-lifecycle
// (allowRemoteLifecycle: true in the injection config) another namespace may
// reload and drain the sidecar; /server_info stays loopback-only.
func TestPrivilegedStatusRemoteLifecycleOptIn(t *testing.T) {
	l := newPodLab(t, 8, "--allow-remote-lifecycle")
	before := l.info(t)
	if code, _ := l.status(t, l.clientDial, http.MethodGet, l.podIP, "/server_info"); code != http.StatusForbidden {
		t.Errorf("/server_info from outside with the opt-in: %d, want 403", code)
	}
	if code, body := l.status(t, l.clientDial, http.MethodPost, l.podIP, "/reload"); code != http.StatusOK {
		t.Fatalf("POST /reload from outside with the opt-in: %d %s", code, body)
	}
	if got := l.info(t).ActiveGeneration; got != before.ActiveGeneration+1 {
		t.Errorf("active generation %d after a remote reload, want %d", got, before.ActiveGeneration+1)
	}
	if code, body := l.status(t, l.clientDial, http.MethodPost, l.podIP6, "/drain"); code != http.StatusOK {
		t.Fatalf("POST /drain from outside with the opt-in: %d %s", code, body)
	}
	eventuallyTrue(t, 5*time.Second, "not ready after a remote /drain", func() bool {
		code, _ := l.get(t, "http://"+l.podIP+":15020/healthz/ready")
		return code == http.StatusServiceUnavailable
	})
	l.alive(t)
}

func eventuallyTrue(t *testing.T, d time.Duration, what string, f func() bool) {
	t.Helper()
	for end := time.Now().Add(d); !f(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(end) {
			t.Fatalf("%s: not within %v", what, d)
		}
	}
}
