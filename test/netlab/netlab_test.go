package netlab_test

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/meshlet/meshlet/test/netlab"
)

func TestPrivilegedVethTrafficAndProcesses(t *testing.T) {
	netlab.Require(t)
	client := netlab.NewNS(t, "mlcap-")
	pod := netlab.NewNS(t, "mlcap-")
	netlab.Veth(t, client, "c0", []string{"10.211.250.1/24", "fd00:211:250::1/64"},
		pod, "p0", []string{"10.211.250.2/24", "fd00:211:250::2/64"})

	for _, addr := range []string{"10.211.250.2:8080", "[fd00:211:250::2]:8080"} {
		l, err := pod.Listen("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		go func() {
			c, err := l.Accept()
			if err != nil {
				return
			}
			_, _ = c.Write([]byte("hello"))
			c.Close()
		}()
		c, err := client.Dial("tcp", addr)
		if err != nil {
			t.Fatalf("dial %s: %v", addr, err)
		}
		b, _ := io.ReadAll(c)
		c.Close()
		l.Close()
		if string(b) != "hello" {
			t.Fatalf("got %q via %s", b, addr)
		}
	}

	// The host namespace must not see the pod's address.
	if _, err := os.Stat(pod.Path); err != nil {
		t.Fatal(err)
	}
	out, err := pod.Run(exec.Command("ip", "-o", "addr", "show", "p0"), -1, -1)
	if err != nil || !strings.Contains(string(out), "10.211.250.2/24") {
		t.Fatalf("ip addr in pod: %v %s", err, out)
	}
	out, err = pod.Run(exec.Command("id", "-u"), 1337, 1337)
	if err != nil || string(bytes.TrimSpace(out)) != "1337" {
		t.Fatalf("id -u as 1337: %v %q", err, out)
	}
	out, err = pod.Run(exec.Command("id", "-g"), 1337, 1337)
	if err != nil || string(bytes.TrimSpace(out)) != "1337" {
		t.Fatalf("id -g as 1337: %v %q", err, out)
	}
}
