package origdst_test

import (
	"errors"
	"net"
	"testing"

	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/proxy/origdst"
	"github.com/meshlet/meshlet/test/netlab"
)

// TestNotRedirected: a connection that reached the listener directly has no
// original destination, and says so.
func TestNotRedirected(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if _, err := origdst.Get(s.(*net.TCPConn)); !errors.Is(err, origdst.ErrNotRedirected) {
		t.Fatalf("Get = %v, want ErrNotRedirected", err)
	}
}

// TestPrivilegedRedirect: through meshlet's real capture rules in a netns
// (iptables REDIRECT), Get returns the address the client dialled, for
// IPv4 and IPv6, on a dual-stack wildcard listener.
func TestPrivilegedRedirect(t *testing.T) {
	netlab.Require(t)
	pod := netlab.NewNS(t, "mlpx-")
	peer := netlab.NewNS(t, "mlpx-")
	netlab.Veth(t, pod, "eth0", []string{"10.212.200.2/24", "fd00:212:200::2/64"}, peer, "p0", []string{"10.212.200.1/24", "fd00:212:200::1/64"})
	o := capture.NewOptions()
	o.IPv6 = "on"
	cfg, err := capture.BuildConfig(o)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := capture.Apply(t.Context(), cfg, capture.Target{NetnsPath: pod.Path}); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ network, listen, dst string }{
		{"tcp4", "0.0.0.0:15001", "10.212.200.1:9000"},
		{"tcp6", "[::]:15001", "[fd00:212:200::1]:9000"},
		{"tcp", ":15001", "10.212.200.1:9001"}, // v4-mapped on a dual-stack socket
	} {
		t.Run(tc.network, func(t *testing.T) {
			ln, err := pod.Listen(tc.network, tc.listen)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			c, err := pod.Dial("tcp", tc.dst) // root in the pod: an app, captured to 15001
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			s, err := ln.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			got, err := origdst.Get(s.(*net.TCPConn))
			if err != nil {
				t.Fatal(err)
			}
			if got.String() != tc.dst {
				t.Errorf("original destination %s, want %s", got, tc.dst)
			}
		})
	}
}
