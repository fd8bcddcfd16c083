package l7

import (
	"io"
	"net/http"
	"net/netip"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/l4"
)

// TestInboundAuthorization: on the inbound route the engine asks
// config.InboundPolicy.Authorize about every request, with the original
// destination, on every serving path (HTTP/1.1 codec, both HTTP/2
// engines): a denial is 403 with body exactly "RBAC: access denied" (gRPC:
// status 7), never reaches the application, is logged with flag RBAC and
// counted per policy; an Update without the authorizer allows again.
func TestInboundAuthorization(t *testing.T) {
	t.Parallel()
	be := startBackend(t, "app", nil)
	const policy = "ns[shop]-policy[admin]-rule[0]"
	var gotDst atomic.Value // netip.AddrPort
	deny := func(r *http.Request, dst netip.AddrPort) (bool, string) {
		gotDst.Store(dst)
		if strings.HasPrefix(r.URL.Path, "/admin") {
			return false, policy
		}
		return true, ""
	}
	for _, engine := range []string{config.H2Frames, config.H2NetHTTP} {
		cfg := config.L7{HTTP2Forwarder: engine, AccessLog: config.AccessLog{Enabled: true}}
		cfg.Inbound.Authorize = deny
		tp := startProxy(t, cfg, be.addr, l4.Inbound)
		for proto, c := range map[string]*http.Client{"h1": h1Client(), "h2c": h2cClient()} {
			before := be.count.Load()
			req, _ := http.NewRequest(http.MethodGet, "http://"+tp.addr+"/admin/users", nil)
			req.Host = "app"
			resp, err := c.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != http.StatusForbidden || string(b) != "RBAC: access denied" {
				t.Errorf("%s %s: /admin/users: %d %q, want 403 \"RBAC: access denied\"", engine, proto, resp.StatusCode, b)
			}
			if be.count.Load() != before {
				t.Errorf("%s %s: a denied request reached the application", engine, proto)
			}
			if d, _ := gotDst.Load().(netip.AddrPort); d.String() != be.addr {
				t.Errorf("%s %s: authorizer saw destination %v, want %s", engine, proto, gotDst.Load(), be.addr)
			}
			if code, _, body := get(t, c, tp.addr, "app", "/public"); code != http.StatusOK || !strings.HasPrefix(body, "app GET") {
				t.Errorf("%s %s: /public: %d %q", engine, proto, code, body)
			}
		}
		// gRPC over h2c: trailers-only PERMISSION_DENIED.
		req, _ := http.NewRequest(http.MethodPost, "http://"+tp.addr+"/admin.Svc/Do", strings.NewReader("\x00\x00\x00\x00\x00"))
		req.Host = "app"
		req.Header.Set("Content-Type", "application/grpc")
		req.Header.Set("Te", "trailers")
		resp, err := h2cClient().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.ReadAll(resp.Body)
		resp.Body.Close()
		if st := resp.Header.Get("Grpc-Status") + resp.Trailer.Get("Grpc-Status"); st != "7" {
			t.Errorf("%s grpc: grpc-status %q, want 7 (PERMISSION_DENIED)", engine, st)
		}
		if n := float64(tp.m.rbacDenied.WithLabelValues(policy).Value()); n != 3 {
			t.Errorf("%s: meshlet_rbac_denied_total{policy=%q} = %v, want 3", engine, policy, n)
		}
		if log := tp.log.String(); strings.Count(log, `"flags":"RBAC"`) != 3 {
			t.Errorf("%s: want 3 access log lines with flag RBAC:\n%s", engine, log)
		}
		cfg.Inbound.Authorize = nil
		if err := tp.Update(cfg); err != nil {
			t.Fatal(err)
		}
		if code, _, _ := get(t, h1Client(), tp.addr, "app", "/admin/users"); code != http.StatusOK {
			t.Errorf("%s: after removing the authorizer /admin/users is %d", engine, code)
		}
	}
}
