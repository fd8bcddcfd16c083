package agent

import (
	"net/http"
	"testing"
)

// TestFromLoopback: which source addresses count as inside the pod.
func TestFromLoopback(t *testing.T) {
	for remote, want := range map[string]bool{
		"127.0.0.1:40000":        true,
		"127.1.2.3:40000":        true,
		"[::1]:40000":            true,
		"[::ffff:127.0.0.1]:400": true,
		"127.0.0.6:40000":        false, // the inbound proxy's passthrough source
		"[::6]:40000":            false,
		"10.1.2.3:40000":         false,
		"[fd00::2]:40000":        false,
		"[::ffff:10.1.2.3]:400":  false,
		"":                       false,
		"garbage":                false,
	} {
		if got := fromLoopback(&http.Request{RemoteAddr: remote}); got != want {
			t.Errorf("fromLoopback(%q) = %v, want %v", remote, got, want)
		}
	}
}
