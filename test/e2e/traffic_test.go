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
