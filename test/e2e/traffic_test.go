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
// only when every call is one connection on each sidecar and nothing failed.
func TestCompareTraffic(t *testing.T) {
	t.Parallel()
	s1 := trafficSnapshot{calls: 5, failures: 2, out: 5, in: 3, outErr: 2}
	good := trafficSnapshot{calls: 15, failures: 2, out: 15, in: 13, outErr: 2}
	if err := compareTraffic(s1, good, 10); err != nil {
		t.Errorf("a healthy window: %v", err)
	}
	for name, bad := range map[string]trafficSnapshot{
		"short window":          {calls: 14, failures: 2, out: 14, in: 12, outErr: 2},
		"a failed call":         {calls: 15, failures: 3, out: 15, in: 12, outErr: 3},
		"outbound undercounted": {calls: 15, failures: 2, out: 14, in: 13, outErr: 2},
		"inbound undercounted":  {calls: 15, failures: 2, out: 15, in: 8, outErr: 2},
		"inbound overcounted":   {calls: 15, failures: 2, out: 15, in: 14, outErr: 2},
		"client sidecar error":  {calls: 15, failures: 2, out: 15, in: 13, outErr: 3},
		"server sidecar error":  {calls: 15, failures: 2, out: 15, in: 13, outErr: 2, inErr: 1},
	} {
		if err := compareTraffic(s1, bad, 10); err == nil {
			t.Errorf("%s: compareTraffic accepted %+v → %+v", name, s1, bad)
		}
	}
}
