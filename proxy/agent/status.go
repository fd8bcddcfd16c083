package agent

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
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
	mux.HandleFunc("/server_info", func(w http.ResponseWriter, _ *http.Request) {
		a.mu.Lock()
		info := a.info
		info.Generations = append([]GenInfo(nil), a.info.Generations...)
		a.mu.Unlock()
		info.UptimeSeconds = time.Since(a.started).Seconds()
		w.Header().Set("Content-Type", "application/json")
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		_ = enc.Encode(info)
	})
	mux.HandleFunc("POST /quitquitquit", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "OK")
		a.post(event{kind: evQuit})
	})
	mux.HandleFunc("POST /drain", func(w http.ResponseWriter, _ *http.Request) {
		a.post(event{kind: evDrain})
		fmt.Fprintln(w, "OK")
	})
	mux.HandleFunc("POST /reload", func(w http.ResponseWriter, r *http.Request) {
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
	})
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
	if a.o.AppMetricsURL != "" {
		if resp, err := statusClient.Get(a.o.AppMetricsURL); err == nil {
			if resp.StatusCode == http.StatusOK {
				_, _ = io.Copy(w, io.LimitReader(resp.Body, 16<<20))
			}
			resp.Body.Close()
		}
	}
}
