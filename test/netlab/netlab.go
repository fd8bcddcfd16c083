// Package netlab is a small network-namespace lab for privileged tests: it
// creates named network namespaces that are removed in t.Cleanup, joins two
// of them with a veth pair, runs Go code inside a namespace on a locked OS
// thread, and starts processes inside a namespace as a given UID/GID.
//
// Sockets opened inside NS.Do stay in that namespace after Do returns, so a
// test can listen or dial "inside" a pod and then use the socket from any
// goroutine. Processes started with NS.Start inherit the namespace of the
// thread that forked them.
//
// Every test using netlab needs root; call Require first, which skips the
// test (with a clear message) under -short or when not root.
//
// Namespace names carry a per-engineer prefix (for example "mlcap-" or
// "mlpx-") so leftovers are attributable; addresses must come from the
// caller's own subnet.
package netlab

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Require skips t unless the test runs as root and not under -short.
func Require(t testing.TB) {
	t.Helper()
	if testing.Short() {
		t.Skip("netlab: skipped under -short (needs root, network namespaces and iptables)")
	}
	if os.Geteuid() != 0 {
		t.Skip("netlab: skipped: needs root for network namespaces")
	}
}

// NS is a named network namespace mounted at /run/netns/Name.
type NS struct {
	// Name is the namespace name (as `ip netns` lists it).
	Name string
	// Path is the bind-mounted namespace file, usable with `ip netns exec`,
	// `nsenter --net=PATH` and `meshlet init --netns PATH`.
	Path string

	handle netns.NsHandle
}

// NewNS creates a fresh network namespace named prefix+random suffix, brings
// its loopback interface up and registers its deletion with t.Cleanup.
func NewNS(t testing.TB, prefix string) *NS {
	t.Helper()
	Require(t)
	ns, err := Create(prefix)
	if err != nil {
		t.Fatalf("netlab: %v", err)
	}
	t.Cleanup(func() {
		if err := ns.Delete(); err != nil {
			t.Errorf("netlab: %v", err)
		}
	})
	return ns
}

// Create is NewNS without a testing.TB: the caller must call Delete. It is
// meant for benchmarks and long-lived soak harnesses.
func Create(prefix string) (*NS, error) {
	var b [4]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil, err
	}
	name := prefix + hex.EncodeToString(b[:])
	ns := &NS{Name: name, Path: filepath.Join("/run/netns", name)}
	err := onLockedThread(func() error {
		orig, err := netns.Get()
		if err != nil {
			return fmt.Errorf("getting current netns: %w", err)
		}
		defer orig.Close()
		// NewNamed unshares the calling thread into the new namespace.
		h, err := netns.NewNamed(name)
		if err != nil {
			return fmt.Errorf("creating netns %s: %w", name, err)
		}
		ns.handle = h
		if err := netns.Set(orig); err != nil {
			return errKeepLocked{fmt.Errorf("restoring netns after creating %s: %w", name, err)}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	if err := ns.SetLinkUp("lo"); err != nil {
		_ = ns.Delete()
		return nil, err
	}
	return ns, nil
}

// Delete closes the handle and unmounts and removes the namespace. Processes
// still running inside keep it alive until they exit.
func (n *NS) Delete() error {
	if n.handle.IsOpen() {
		_ = n.handle.Close()
	}
	if err := netns.DeleteNamed(n.Name); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("deleting netns %s: %w", n.Name, err)
	}
	return nil
}

// Handle returns the namespace's file handle (owned by NS; do not close).
func (n *NS) Handle() netns.NsHandle { return n.handle }

// Do runs fn with its goroutine locked to an OS thread that is inside the
// namespace. If the thread cannot be switched back afterwards it stays locked,
// so the Go runtime discards it instead of reusing a thread in the wrong
// namespace.
func (n *NS) Do(fn func() error) error {
	return onLockedThread(func() error {
		orig, err := netns.Get()
		if err != nil {
			return fmt.Errorf("getting current netns: %w", err)
		}
		defer orig.Close()
		if err := netns.Set(n.handle); err != nil {
			return fmt.Errorf("entering netns %s: %w", n.Name, err)
		}
		fnErr := fn()
		if err := netns.Set(orig); err != nil {
			return errKeepLocked{errors.Join(fmt.Errorf("leaving netns %s: %w", n.Name, err), fnErr)}
		}
		return fnErr
	})
}

// errKeepLocked marks a failure after which the thread must stay locked.
type errKeepLocked struct{ error }

func (e errKeepLocked) Unwrap() error { return e.error }

// onLockedThread runs fn on a fresh goroutine locked to its OS thread. The
// thread is unlocked only if fn did not report errKeepLocked.
func onLockedThread(fn func() error) error {
	done := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		err := fn()
		var keep errKeepLocked
		if !errors.As(err, &keep) {
			runtime.UnlockOSThread()
		}
		done <- err
	}()
	return <-done
}

// SetLinkUp sets the named link up inside the namespace.
func (n *NS) SetLinkUp(name string) error {
	h, err := netlink.NewHandleAt(n.handle)
	if err != nil {
		return fmt.Errorf("netlink handle for %s: %w", n.Name, err)
	}
	defer h.Close()
	l, err := h.LinkByName(name)
	if err != nil {
		return fmt.Errorf("link %s in %s: %w", name, n.Name, err)
	}
	if err := h.LinkSetUp(l); err != nil {
		return fmt.Errorf("setting %s up in %s: %w", name, n.Name, err)
	}
	return nil
}

// AddAddr adds an address in CIDR form (IPv4 or IPv6) to a link in the
// namespace. IPv6 addresses skip duplicate address detection so they are
// usable at once.
func (n *NS) AddAddr(link, cidr string) error {
	h, err := netlink.NewHandleAt(n.handle)
	if err != nil {
		return fmt.Errorf("netlink handle for %s: %w", n.Name, err)
	}
	defer h.Close()
	l, err := h.LinkByName(link)
	if err != nil {
		return fmt.Errorf("link %s in %s: %w", link, n.Name, err)
	}
	addr, err := netlink.ParseAddr(cidr)
	if err != nil {
		return fmt.Errorf("address %q: %w", cidr, err)
	}
	if addr.IP.To4() == nil {
		addr.Flags |= unix.IFA_F_NODAD
	}
	if err := h.AddrAdd(l, addr); err != nil {
		return fmt.Errorf("adding %s to %s in %s: %w", cidr, link, n.Name, err)
	}
	return nil
}

// Veth joins a and b with a veth pair: interface aIf in a with the addresses
// aAddrs, bIf in b with bAddrs (CIDR form, IPv4 and/or IPv6). Both ends and
// their loopbacks are up when it returns. The pair disappears with either
// namespace.
func Veth(t testing.TB, a *NS, aIf string, aAddrs []string, b *NS, bIf string, bAddrs []string) {
	t.Helper()
	if err := VethPair(a, aIf, aAddrs, b, bIf, bAddrs); err != nil {
		t.Fatalf("netlab: %v", err)
	}
}

// VethPair is Veth returning an error instead of failing a test.
func VethPair(a *NS, aIf string, aAddrs []string, b *NS, bIf string, bAddrs []string) error {
	ha, err := netlink.NewHandleAt(a.handle)
	if err != nil {
		return fmt.Errorf("netlink handle for %s: %w", a.Name, err)
	}
	defer ha.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: aIf},
		PeerName:      bIf,
		PeerNamespace: netlink.NsFd(b.handle),
	}
	if err := ha.LinkAdd(veth); err != nil {
		return fmt.Errorf("creating veth %s(%s) <-> %s(%s): %w", aIf, a.Name, bIf, b.Name, err)
	}
	for _, side := range []struct {
		ns    *NS
		link  string
		addrs []string
	}{{a, aIf, aAddrs}, {b, bIf, bAddrs}} {
		for _, c := range side.addrs {
			if err := side.ns.AddAddr(side.link, c); err != nil {
				return err
			}
		}
		if err := side.ns.SetLinkUp(side.link); err != nil {
			return err
		}
	}
	return nil
}

// Start starts cmd inside the namespace. If uid or gid is >= 0 the process
// runs with that UID/GID (and no supplementary groups); -1 keeps the caller's.
// The caller waits for the process as usual.
func (n *NS) Start(cmd *exec.Cmd, uid, gid int) error {
	if uid >= 0 || gid >= 0 {
		if cmd.SysProcAttr == nil {
			cmd.SysProcAttr = &syscall.SysProcAttr{}
		}
		cred := &syscall.Credential{Uid: uint32(os.Getuid()), Gid: uint32(os.Getgid()), Groups: []uint32{}}
		if uid >= 0 {
			cred.Uid = uint32(uid)
		}
		if gid >= 0 {
			cred.Gid = uint32(gid)
		}
		cmd.SysProcAttr.Credential = cred
	}
	// The child is forked from this locked thread, so it inherits the namespace.
	return n.Do(cmd.Start)
}

// Run is Start followed by Wait; it returns the combined output when
// cmd.Stdout and cmd.Stderr are unset.
func (n *NS) Run(cmd *exec.Cmd, uid, gid int) ([]byte, error) {
	var out []byte
	var buf outBuf
	if cmd.Stdout == nil && cmd.Stderr == nil {
		cmd.Stdout = &buf
		cmd.Stderr = &buf
	}
	if err := n.Start(cmd, uid, gid); err != nil {
		return nil, err
	}
	err := cmd.Wait()
	out = buf.b
	if err != nil {
		return out, fmt.Errorf("%s in %s: %w: %s", cmd.String(), n.Name, err, out)
	}
	return out, nil
}

type outBuf struct{ b []byte }

func (o *outBuf) Write(p []byte) (int, error) { o.b = append(o.b, p...); return len(p), nil }

// Listen opens a listener inside the namespace (network "tcp", "tcp4",
// "tcp6", address as for net.Listen). The listener stays in the namespace.
func (n *NS) Listen(network, addr string) (net.Listener, error) {
	var l net.Listener
	err := n.Do(func() error {
		var err error
		l, err = net.Listen(network, addr)
		return err
	})
	return l, err
}

// Dial connects from inside the namespace as the current (root) process.
func (n *NS) Dial(network, addr string) (net.Conn, error) {
	var c net.Conn
	err := n.Do(func() error {
		var err error
		c, err = net.Dial(network, addr)
		return err
	})
	return c, err
}

var (
	selfOnce sync.Once
	selfPath string
	selfErr  error
)

// sweepStaleSelfCopies removes copies left by test binaries that were
// killed before RemoveSelfCopy ran (older than any test timeout).
func sweepStaleSelfCopies() {
	old, _ := filepath.Glob(filepath.Join(os.TempDir(), "netlab-self-*"))
	for _, d := range old {
		if st, err := os.Stat(d); err == nil && time.Since(st.ModTime()) > 2*time.Hour {
			_ = os.RemoveAll(d)
		}
	}
}

// RemoveSelfCopy deletes the copy SelfCopy made, if any; call it from
// TestMain after m.Run.
func RemoveSelfCopy() {
	if selfPath != "" {
		_ = os.RemoveAll(filepath.Dir(selfPath))
	}
}

// SelfCopy returns a copy of the running test binary that any UID may
// execute (go test's build directory is private to root), for tests that
// re-exec themselves as a child process with another UID. The copy is made
// once per test binary in a netlab-self-* temp dir; RemoveSelfCopy deletes it.
func SelfCopy(t testing.TB) string {
	t.Helper()
	selfOnce.Do(func() {
		sweepStaleSelfCopies()
		dir, err := os.MkdirTemp("", "netlab-self-")
		if err != nil {
			selfErr = err
			return
		}
		if err := os.Chmod(dir, 0o755); err != nil {
			selfErr = err
			return
		}
		src, err := os.Open("/proc/self/exe")
		if err != nil {
			selfErr = err
			return
		}
		defer src.Close()
		p := filepath.Join(dir, filepath.Base(os.Args[0]))
		dst, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY, 0o755)
		if err != nil {
			selfErr = err
			return
		}
		if _, err := io.Copy(dst, src); err != nil {
			dst.Close()
			selfErr = err
			return
		}
		selfErr = dst.Close()
		selfPath = p
	})
	if selfErr != nil {
		t.Fatalf("netlab: copying test binary: %v", selfErr)
	}
	return selfPath
}
