package main

import (
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"
)

// TestRunHandler drives the load driver's /run against a server answering
// as the echo image does (its JSON reply) on /public and as a sidecar's
// authorization denial (403 RBAC: access denied) on every other path or
// method, and against an address nothing listens on: every call is
// counted once, by status, by body for the denials, by the echoed header
// for the replies, or as an error.
func TestRunHandler(t *testing.T) {
	t.Parallel()
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet || r.URL.Path != "/public" {
			http.Error(w, "RBAC: access denied", http.StatusForbidden)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(map[string]any{"hostname": "echo-1", "path": r.URL.Path, "headers": r.Header})
	}))
	defer backend.Close()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := "http://" + l.Addr().String() + "/public"
	l.Close()
	driver := httptest.NewServer(runHandler(&http.Client{Timeout: 5 * time.Second}))
	defer driver.Close()

	run := func(t *testing.T, q url.Values) (int, Batch, string) {
		t.Helper()
		resp, err := http.Get(driver.URL + "/run?" + q.Encode())
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var b Batch
		var raw strings.Builder
		if resp.StatusCode == http.StatusOK {
			if err := json.NewDecoder(resp.Body).Decode(&b); err != nil {
				t.Fatal(err)
			}
		} else {
			buf := make([]byte, 512)
			n, _ := resp.Body.Read(buf)
			raw.Write(buf[:n])
		}
		return resp.StatusCode, b, raw.String()
	}
	for _, tc := range []struct {
		name string
		q    url.Values
		want Batch
	}{
		{"replies with the echoed header", url.Values{"url": {backend.URL + "/public"}, "n": {"7"}, "header": {"X-Caller: a"}, "echoHeader": {"x-caller"}},
			Batch{Calls: 7, Servers: map[string]int{"echo-1": 7}, Statuses: map[string]int{"200": 7}, Echoed: map[string]int{"a": 7}}},
		{"a header the server did not get", url.Values{"url": {backend.URL + "/public"}, "n": {"3"}, "echoHeader": {"X-Forwarded-Client-Cert"}},
			Batch{Calls: 3, Servers: map[string]int{"echo-1": 3}, Statuses: map[string]int{"200": 3}, Echoed: map[string]int{"": 3}}},
		{"denied path", url.Values{"url": {backend.URL + "/private"}, "n": {"4"}},
			Batch{Calls: 4, Servers: map[string]int{}, Statuses: map[string]int{"403": 4}, Bodies: map[string]int{"RBAC: access denied": 4}}},
		{"denied method", url.Values{"url": {backend.URL + "/public"}, "n": {"2"}, "method": {"POST"}},
			Batch{Calls: 2, Servers: map[string]int{}, Statuses: map[string]int{"403": 2}, Bodies: map[string]int{"RBAC: access denied": 2}}},
		{"nothing listening", url.Values{"url": {closed}, "n": {"3"}},
			Batch{Calls: 3, Servers: map[string]int{}, Statuses: map[string]int{}, Errors: 3}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			code, got, raw := run(t, tc.q)
			if code != http.StatusOK {
				t.Fatalf("/run: %d %s", code, raw)
			}
			if got.Errors > 0 && len(got.FirstErrors) == 0 {
				t.Errorf("%d errors but none shown", got.Errors)
			}
			got.FirstErrors = nil
			if got.Bodies == nil {
				got.Bodies = map[string]int{}
			}
			if tc.want.Bodies == nil {
				tc.want.Bodies = map[string]int{}
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Errorf("batch %+v, want %+v", got, tc.want)
			}
		})
	}
	for _, bad := range []url.Values{
		{"url": {backend.URL}, "n": {"0"}},
		{"n": {"1"}},
		{"url": {backend.URL}, "n": {"1"}, "method": {"GE T"}},
		{"url": {backend.URL}, "n": {"1"}, "header": {"no-colon"}},
	} {
		if code, _, raw := run(t, bad); code != http.StatusBadRequest || raw == "" {
			t.Errorf("/run?%s: %d %q, want 400 saying why", bad.Encode(), code, raw)
		}
	}
}
