package validate

import (
	"errors"
	"net"
	"testing"
	"time"

	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/internal/proctest"
)

func TestRefusesOtherIdentities(t *testing.T) {
	t.Parallel()
	c, err := capture.BuildConfig(capture.NewOptions())
	if err != nil {
		t.Fatal(err)
	}
	_, err = Run(t.Context(), c, Options{UID: 4242, GID: 4242, Timeout: time.Second})
	if !errors.Is(err, ErrWrongIdentity) {
		t.Fatalf("got %v, want ErrWrongIdentity", err)
	}
}

// Without capture rules the probe to 127.0.0.6:15002 is refused: the probe
// must report ErrCaptureNotWorking rather than pass. (Runs on the test
// host's loopback; uses free capture ports so it binds nothing common.)
func TestNoCaptureIsReported(t *testing.T) {
	t.Parallel()
	o := capture.NewOptions()
	// Ports below the ephemeral range, picked free: fixed ones in it were
	// sometimes some other process's source port on this shared host.
	port := func() string {
		_, p, _ := net.SplitHostPort(proctest.FreePort(t))
		return p
	}
	o.ProxyPort, o.InboundCapturePort = port(), port()
	c, err := capture.BuildConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	c.IPv6 = capture.IPv6Off
	_, err = Run(t.Context(), c, Options{UID: 1337, GID: 1337, Timeout: 500 * time.Millisecond})
	if !errors.Is(err, ErrCaptureNotWorking) {
		t.Fatalf("got %v, want ErrCaptureNotWorking", err)
	}
}
