package e2e

import "testing"

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
