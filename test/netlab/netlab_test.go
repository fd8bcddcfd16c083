package netlab_test

import (
	"bytes"
	"io"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
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

	// The pod namespace has the pod's address; the host namespace has
	// neither the addresses nor the veth ends, and no thread of this
	// process was left in a lab namespace by Listen, Dial or Do (Go reuses
	// threads: a leaked one would run later code in the wrong namespace).
	if _, err := os.Stat(pod.Path); err != nil {
		t.Fatal(err)
	}
	for range 16 {
		if err := pod.Do(func() error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	checkHostNamespace(t, []string{"10.211.250.", "fd00:211:250:"}, []string{"c0", "p0"})
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

// hostNetns is the network namespace the process started in, read while
// package variables are initialised: on the main goroutine, locked to the
// main thread, before any test ran. (Reading /proc/self/ns/net later names
// the main thread's namespace, and the main thread runs goroutines too: if
// it were one a lab namespace leaked into, every thread would be compared
// with the leaked namespace.)
var hostNetns, hostNetnsErr = os.Readlink("/proc/thread-self/ns/net")

// checkHostNamespace asserts, from many goroutines each locked to an OS
// thread, that the thread is in the network namespace the process started
// in (the host's) and that neither those address prefixes nor those links
// exist there; then that `ip -o addr` run from this process agrees.
func checkHostNamespace(t *testing.T, prefixes, links []string) {
	t.Helper()
	if hostNetnsErr != nil {
		t.Fatal(hostNetnsErr)
	}
	host := hostNetns
	var (
		wg   sync.WaitGroup
		mu   sync.Mutex
		seen = map[string]bool{}
	)
	report := func(msg string) {
		mu.Lock()
		defer mu.Unlock()
		if !seen[msg] {
			seen[msg] = true
			t.Error(msg)
		}
	}
	for range 32 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			if ns, err := os.Readlink("/proc/thread-self/ns/net"); err != nil || ns != host {
				report("a thread is in network namespace " + ns + ", not the host's " + host)
				return
			}
			addrs, err := net.InterfaceAddrs()
			if err != nil {
				report(err.Error())
				return
			}
			for _, a := range addrs {
				for _, p := range prefixes {
					if strings.HasPrefix(a.String(), p) {
						report("the host namespace has the lab address " + a.String())
					}
				}
			}
			for _, l := range links {
				if _, err := net.InterfaceByName(l); err == nil {
					report("the host namespace has the lab link " + l)
				}
			}
		}()
	}
	wg.Wait()
	out, err := exec.Command("ip", "-o", "addr").CombinedOutput()
	if err != nil {
		t.Fatalf("ip -o addr in the host namespace: %v: %s", err, out)
	}
	for _, p := range prefixes {
		if strings.Contains(string(out), " "+p) {
			t.Errorf("ip -o addr in the host namespace shows %s*:\n%s", p, out)
		}
	}
}
