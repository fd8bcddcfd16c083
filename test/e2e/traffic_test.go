package e2e

import (
	"regexp"
	"strings"
	"testing"
)

// TestCountClientCalls checks the reading of the demo client's log that the
// traffic assertion compares with the sidecars' counters.
func TestCountClientCalls(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name            string
		log             string
		calls, failures int
		wantErr         bool
	}{
		{"empty", "", 0, 0, false},
		{"all ok", "ok 200 attempt=1 server=a\nok 200 attempt=2 server=a\n", 2, 0, false},
		{"failures counted", "error attempt=1 dial tcp: refused\nok 200 attempt=2 server=a\nerror attempt=3 status 503: x\n", 3, 2, false},
		{"gap", "ok 200 attempt=1 server=a\nok 200 attempt=3 server=a\n", 0, 0, true},
		{"restarted client", "ok 200 attempt=1 server=a\nok 200 attempt=2 server=a\nok 200 attempt=1 server=a\n", 0, 0, true},
		{"unknown line", "ok 200 attempt=1 server=a\npanic: boom\n", 0, 0, true},
		{"other status is not ok", "ok 2000 attempt=1 server=a\n", 0, 0, true},
	} {
		calls, failures, err := countClientCalls(tc.log)
		if (err != nil) != tc.wantErr || err == nil && (calls != tc.calls || failures != tc.failures) {
			t.Errorf("%s: countClientCalls = %d, %d, %v; want %d, %d, error %v", tc.name, calls, failures, err, tc.calls, tc.failures, tc.wantErr)
		}
	}
}

// TestCompareTraffic checks the comparison of a traffic window: it passes
// only when every call is one connection on the client's sidecar, one HTTP
// request on each sidecar, all 2xx, at most one inbound connection per call
// on the server's sidecar, and nothing failed.
func TestCompareTraffic(t *testing.T) {
	t.Parallel()
	s1 := trafficSnapshot{calls: 5, failures: 2, out: 5, in: 1, outErr: 2, outReq: 5, outReq2xx: 3, inReq: 3, inReq2xx: 3}
	good := trafficSnapshot{calls: 15, failures: 2, out: 15, in: 2, outErr: 2, outReq: 15, outReq2xx: 13, inReq: 13, inReq2xx: 13}
	if err := compareTraffic(s1, good, 10); err != nil {
		t.Errorf("a healthy window: %v", err)
	}
	unpooled := good
	unpooled.in = 11
	if err := compareTraffic(s1, unpooled, 10); err != nil {
		t.Errorf("one inbound connection per call: %v", err)
	}
	change := func(f func(*trafficSnapshot)) trafficSnapshot { s := good; f(&s); return s }
	for name, bad := range map[string]trafficSnapshot{
		"short window": change(func(s *trafficSnapshot) {
			s.calls, s.out, s.outReq, s.outReq2xx, s.inReq, s.inReq2xx = 14, 14, 14, 12, 12, 12
		}),
		"a failed call":           change(func(s *trafficSnapshot) { s.failures = 3 }),
		"outbound undercounted":   change(func(s *trafficSnapshot) { s.out = 14 }),
		"inbound overcounted":     change(func(s *trafficSnapshot) { s.in = 12 }),
		"inbound went backwards":  change(func(s *trafficSnapshot) { s.in = 0 }),
		"request not via cluster": change(func(s *trafficSnapshot) { s.outReq, s.outReq2xx = 14, 12 }),
		"a 5xx answer":            change(func(s *trafficSnapshot) { s.outReq2xx = 12 }),
		"inbound request missing": change(func(s *trafficSnapshot) { s.inReq, s.inReq2xx = 12, 12 }),
		"inbound non-2xx":         change(func(s *trafficSnapshot) { s.inReq2xx = 12 }),
		"client sidecar error":    change(func(s *trafficSnapshot) { s.outErr = 3 }),
		"server sidecar error":    change(func(s *trafficSnapshot) { s.inErr = 1 }),
	} {
		if err := compareTraffic(s1, bad, 10); err == nil {
			t.Errorf("%s: compareTraffic accepted %+v → %+v", name, s1, bad)
		}
	}
}

// TestZeroTrustChecks checks TestZeroTrust's readings of a batch: served
// (every call 200 from the echo server, with one expected XFCC or none),
// denied (every call 403 RBAC: access denied) and refused (no answer at
// all, by a closed connection).
func TestZeroTrustChecks(t *testing.T) {
	t.Parallel()
	front := xfccFrom(ztFrontend, "web")
	good := "By=spiffe://cluster.local/ns/zt-backend/sa/echo;Hash=" + strings.Repeat("ab", 32) + ";URI=spiffe://cluster.local/ns/frontend/sa/web"
	served := batch{Calls: 3, Servers: map[string]int{"echo-1": 3}, Statuses: map[string]int{"200": 3}, Echoed: map[string]int{good: 3}}
	if err := checkServed(served, 3, front); err != nil {
		t.Errorf("served over mutual TLS: %v", err)
	}
	plain := batch{Calls: 3, Servers: map[string]int{"echo-1": 3}, Statuses: map[string]int{"200": 3}, Echoed: map[string]int{"": 3}}
	if err := checkServed(plain, 3, nil); err != nil {
		t.Errorf("served in plain text: %v", err)
	}
	for name, c := range map[string]struct {
		b    batch
		xfcc *regexp.Regexp
	}{
		"fewer calls":         {batch{Calls: 2, Servers: map[string]int{"echo-1": 2}, Statuses: map[string]int{"200": 2}, Echoed: map[string]int{good: 2}}, front},
		"one error":           {batch{Calls: 3, Servers: map[string]int{"echo-1": 2}, Statuses: map[string]int{"200": 2}, Errors: 1, Echoed: map[string]int{good: 2}}, front},
		"one 403":             {batch{Calls: 3, Servers: map[string]int{"echo-1": 2}, Statuses: map[string]int{"200": 2, "403": 1}, Echoed: map[string]int{good: 2}}, front},
		"not the echo server": {batch{Calls: 3, Servers: map[string]int{"echo-1": 2}, Statuses: map[string]int{"200": 3}, Echoed: map[string]int{good: 3}}, front},
		"another caller":      {batch{Calls: 3, Servers: map[string]int{"echo-1": 3}, Statuses: map[string]int{"200": 3}, Echoed: map[string]int{strings.Replace(good, "ns/frontend", "ns/zt-other", 1): 3}}, front},
		"forged XFCC reached": {batch{Calls: 3, Servers: map[string]int{"echo-1": 3}, Statuses: map[string]int{"200": 3}, Echoed: map[string]int{good + ", " + forgedXFCC: 3}}, front},
		"one call without":    {batch{Calls: 3, Servers: map[string]int{"echo-1": 3}, Statuses: map[string]int{"200": 3}, Echoed: map[string]int{good: 2, "": 1}}, front},
		"XFCC on plain text":  {batch{Calls: 3, Servers: map[string]int{"echo-1": 3}, Statuses: map[string]int{"200": 3}, Echoed: map[string]int{forgedXFCC: 3}}, nil},
		"short hash":          {batch{Calls: 3, Servers: map[string]int{"echo-1": 3}, Statuses: map[string]int{"200": 3}, Echoed: map[string]int{strings.Replace(good, "abab", "ab", 1): 3}}, front},
	} {
		if err := checkServed(c.b, 3, c.xfcc); err == nil {
			t.Errorf("checkServed accepted %s: %v", name, c.b)
		}
	}

	denied := batch{Calls: 4, Statuses: map[string]int{"403": 4}, Bodies: map[string]int{"RBAC: access denied": 4}}
	if err := checkDenied(denied, 4); err != nil {
		t.Errorf("denied: %v", err)
	}
	for name, b := range map[string]batch{
		"one served":    {Calls: 4, Servers: map[string]int{"echo-1": 1}, Statuses: map[string]int{"403": 3, "200": 1}, Bodies: map[string]int{"RBAC: access denied": 3}},
		"another body":  {Calls: 4, Statuses: map[string]int{"403": 4}, Bodies: map[string]int{"RBAC: access denied": 3, "forbidden": 1}},
		"an error":      {Calls: 4, Statuses: map[string]int{"403": 3}, Errors: 1, Bodies: map[string]int{"RBAC: access denied": 3}},
		"fewer calls":   {Calls: 3, Statuses: map[string]int{"403": 3}, Bodies: map[string]int{"RBAC: access denied": 3}},
		"a 503 instead": {Calls: 4, Statuses: map[string]int{"503": 4}, Bodies: map[string]int{"RBAC: access denied": 4}},
	} {
		if err := checkDenied(b, 4); err == nil {
			t.Errorf("checkDenied accepted %s: %v", name, b)
		}
	}

	refused := batch{Calls: 5, Errors: 5, Statuses: map[string]int{}, FirstErrors: []string{
		`Get "http://echo.zt-backend.svc.cluster.local:8080/public": read tcp 10.1.0.5:40000->10.1.0.4:8080: read: connection reset by peer`,
		`Get "http://echo.zt-backend.svc.cluster.local:8080/public": EOF`,
	}}
	if err := checkRefused(refused, 5); err != nil {
		t.Errorf("refused: %v", err)
	}
	for name, b := range map[string]batch{
		"one answered": {Calls: 5, Errors: 4, Statuses: map[string]int{"200": 1}, FirstErrors: refused.FirstErrors},
		"a timeout":    {Calls: 5, Errors: 5, FirstErrors: []string{`Get "http://echo.zt-backend.svc.cluster.local:8080/public": context deadline exceeded (Client.Timeout exceeded while awaiting headers)`}},
		"no such host": {Calls: 5, Errors: 5, FirstErrors: []string{`Get "http://echo.zt-backend.svc.cluster.local:8080/public": dial tcp: lookup echo.zt-backend.svc.cluster.local: no such host`}},
		"none shown":   {Calls: 5, Errors: 5},
		"fewer calls":  {Calls: 4, Errors: 4, FirstErrors: refused.FirstErrors},
	} {
		if err := checkRefused(b, 5); err == nil {
			t.Errorf("checkRefused accepted %s: %v", name, b)
		}
	}
}
