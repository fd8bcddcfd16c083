package agent

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"sync"
	"time"
)

var statusClient = &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}

// localURL returns an http URL reaching listener name on loopback.
func (a *Agent) localURL(name, path string) string {
	for _, s := range a.socks {
		if s.name != name {
			continue
		}
		host := "127.0.0.1"
		if s.addr.IP.To4() == nil && !s.addr.IP.IsUnspecified() {
			host = "::1"
		} else if ip := s.addr.IP.To4(); ip != nil && !ip.IsUnspecified() {
			host = ip.String()
		}
		return "http://" + net.JoinHostPort(host, strconv.Itoa(s.addr.Port)) + path
	}
	return ""
}

// Ready reports whether the active generation answers /healthz/ready on its
// health listener (through the data path) and the agent is not draining.
func (a *Agent) Ready() bool {
	a.mu.Lock()
	ready := a.info.Ready
	a.mu.Unlock()
	if !ready {
		return false
	}
	u := a.healthURL
	if u == "" {
		return true
	}
	resp, err := statusClient.Get(u)
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// The status endpoints only callers inside the pod may use. The
// state-changing ones stop, drain or hot-restart the sidecar; /server_info
// shows config hashes and reload errors. Every pod in the cluster can reach
// 15020 (it is excluded from inbound capture so the kubelet's probes work),
// so without this check any pod could take any other pod's sidecar down.
// Options.AllowRemoteLifecycle opens the state-changing ones to the network;
// /server_info stays loopback-only.
var podOnlyPaths = []string{"/quitquitquit", "/drain", "/reload", "/server_info"}

// statusDenials counts refused status calls by path, and paces their logs.
type statusDenials struct {
	mu     sync.Mutex
	n      map[string]uint64
	logged map[string]time.Time
	quiet  map[string]uint64 // refusals not logged since the last log line
}

// add counts a refusal of path. It reports whether to log it (at most one
// line per path and second, so a caller in a loop cannot flood the sidecar's
// log) and how many refusals of path went unlogged before it.
func (d *statusDenials) add(path string, now time.Time) (log bool, unlogged uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.n == nil {
		d.n, d.logged, d.quiet = map[string]uint64{}, map[string]time.Time{}, map[string]uint64{}
	}
	d.n[path]++
	if last, ok := d.logged[path]; ok && now.Sub(last) < time.Second {
		d.quiet[path]++
		return false, 0
	}
	unlogged = d.quiet[path]
	d.logged[path], d.quiet[path] = now, 0
	return true, unlogged
}

func (d *statusDenials) write(w io.Writer) {
	d.mu.Lock()
	defer d.mu.Unlock()
	fmt.Fprintln(w, "# HELP meshlet_agent_status_denied_total Status server calls refused because they did not come from inside the pod (a loopback source), by path.")
	fmt.Fprintln(w, "# TYPE meshlet_agent_status_denied_total counter")
	for _, p := range podOnlyPaths {
		fmt.Fprintf(w, "meshlet_agent_status_denied_total{path=%q} %d\n", p, d.n[p])
	}
}

// inboundPassthroughSource is the source address of the inbound proxy's
// connections to the app (DESIGN: 127.0.0.6). A caller from the network would
// arrive from it if 15020 were ever captured, so it never counts as inside
// the pod. (Its IPv6 twin, ::6, is not a loopback address anyway.)
var inboundPassthroughSource = netip.MustParseAddr("127.0.0.6")

// fromLoopback reports whether r came from inside the pod: a loopback source
// address (127.0.0.0/8, ::1, or an IPv4-mapped loopback address on a
// dual-stack socket), other than the inbound passthrough source.
func fromLoopback(r *http.Request) bool {
	ap, err := netip.ParseAddrPort(r.RemoteAddr)
	if err != nil {
		return false
	}
	a := ap.Addr().Unmap()
	return a.IsLoopback() && a != inboundPassthroughSource
}

// podOnly serves h only to callers inside the pod (see podOnlyPaths); anyone
// else gets 403 with the reason, is logged and counted. remoteOK lets
// everyone through (the injection config's explicit opt-in).
func (a *Agent) podOnly(path string, remoteOK bool, h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if remoteOK || fromLoopback(r) {
			h(w, r)
			return
		}
		if log, unlogged := a.denied.add(path, time.Now()); log {
			a.log.Warn("Refused status call from outside the pod", "method", r.Method, "path", path, "remote", r.RemoteAddr,
				"unloggedSinceLastLine", unlogged)
		}
		msg := fmt.Sprintf("%s %s is only served to callers inside the pod (a loopback source address such as 127.0.0.1 or ::1); %s is not one.", r.Method, path, r.RemoteAddr)
		if path != "/server_info" {
			msg += " To allow it from the network, set allowRemoteLifecycle: true in the injection config (meshlet agent --allow-remote-lifecycle)."
		}
		http.Error(w, msg, http.StatusForbidden)
	}
}

func (a *Agent) statusMux() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, _ *http.Request) {
		if !a.Ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.HandleFunc("/stats/prometheus", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
		a.writeMetrics(w)
	})
	mux.HandleFunc("/server_info", a.podOnly("/server_info", false, func(w http.ResponseWriter, _ *http.Request) {
		a.mu.Lock()
		info := a.info
		info.Generations = append([]GenInfo(nil), a.info.Generations...)
		a.mu.Unlock()
		info.UptimeSeconds = time.Since(a.started).Seconds()
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(info)
	}))
	remote := a.o.AllowRemoteLifecycle
	mux.HandleFunc("POST /quitquitquit", a.podOnly("/quitquitquit", remote, func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "OK")
		a.post(event{kind: evQuit})
	}))
	mux.HandleFunc("POST /drain", a.podOnly("/drain", remote, func(w http.ResponseWriter, _ *http.Request) {
		a.post(event{kind: evDrain})
		fmt.Fprintln(w, "OK")
	}))
	mux.HandleFunc("POST /reload", a.podOnly("/reload", remote, func(w http.ResponseWriter, r *http.Request) {
		ch := make(chan ReloadResult, 1)
		a.Reload("POST /reload", ch)
		var res ReloadResult
		select {
		case res = <-ch:
		case <-r.Context().Done():
			return
		case <-a.done:
			res.Error = "agent stopped"
		}
		w.Header().Set("Content-Type", "application/json")
		if res.Error != "" {
			w.WriteHeader(http.StatusInternalServerError)
		}
		_ = json.NewEncoder(w).Encode(res)
	}))
	return mux
}

// writeMetrics merges the proxy's metrics (which include the agent's shared
// counters), the agent's gauges and, if configured, the application's.
func (a *Agent) writeMetrics(w io.Writer) {
	proxied := false
	if u := a.promURL; u != "" {
		if resp, err := statusClient.Get(u); err == nil {
			if resp.StatusCode == http.StatusOK {
				_, _ = io.Copy(w, resp.Body)
				proxied = true
			}
			resp.Body.Close()
		}
	}
	if !proxied {
		_ = a.region.WritePrometheus(w)
	}
	a.mu.Lock()
	live := len(a.info.Generations)
	active := a.info.ActiveGeneration
	a.mu.Unlock()
	fmt.Fprintf(w, "# TYPE meshlet_agent_live_generations gauge\nmeshlet_agent_live_generations %d\n", live)
	fmt.Fprintf(w, "# TYPE meshlet_agent_active_generation gauge\nmeshlet_agent_active_generation %d\n", active)
	fmt.Fprintf(w, "# TYPE meshlet_agent_uptime_seconds gauge\nmeshlet_agent_uptime_seconds %.3f\n", time.Since(a.started).Seconds())
	a.denied.write(w)
	if a.o.AppMetricsURL != "" {
		if resp, err := statusClient.Get(a.o.AppMetricsURL); err == nil {
			if resp.StatusCode == http.StatusOK {
				_, _ = io.Copy(w, io.LimitReader(resp.Body, 16<<20))
			}
			resp.Body.Close()
		}
	}
}
