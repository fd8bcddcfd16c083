// Package origdst reads the original destination of a connection that
// iptables REDIRECTed to a local listener: getsockopt(SOL_IP,
// SO_ORIGINAL_DST) for IPv4 and getsockopt(SOL_IPV6, IP6T_SO_ORIGINAL_DST)
// for IPv6. It works on the accepted socket through SyscallConn().Control, so
// no file descriptor is duplicated per connection.
package origdst

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ip6tSOOriginalDst is IP6T_SO_ORIGINAL_DST from linux/netfilter_ipv6/ip6_tables.h.
const ip6tSOOriginalDst = 80

// ErrNotRedirected is returned when the connection has no conntrack NAT
// entry, i.e. it reached the listener directly rather than through a
// REDIRECT rule.
var ErrNotRedirected = errors.New("connection was not redirected (no original destination)")

// Get returns the original destination of c. IPv4 connections on an IPv6
// socket (v4-mapped) are asked at the IPv4 level.
func Get(c *net.TCPConn) (netip.AddrPort, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	local, _ := c.LocalAddr().(*net.TCPAddr)
	v4 := local != nil && local.IP.To4() != nil
	var dst netip.AddrPort
	var serr error
	if err := rc.Control(func(fd uintptr) { dst, serr = FromFD(int(fd), v4) }); err != nil {
		return netip.AddrPort{}, fmt.Errorf("original destination: %w", err)
	}
	if serr != nil {
		return dst, serr
	}
	// With NAT conntrack loaded but no rule applied, the kernel answers with
	// the connection's own local address instead of ENOENT.
	if local != nil && dst.Port() == uint16(local.Port) && dst.Addr().Unmap() == local.AddrPort().Addr().Unmap() {
		return netip.AddrPort{}, fmt.Errorf("original destination %s is the local address: %w", dst, ErrNotRedirected)
	}
	return dst, nil
}

// FromFD reads the original destination of the socket fd; v4 selects the
// IPv4 option, otherwise the IPv6 one.
func FromFD(fd int, v4 bool) (netip.AddrPort, error) {
	if v4 {
		var sa unix.RawSockaddrInet4
		if err := getsockopt(fd, unix.SOL_IP, unix.SO_ORIGINAL_DST, unsafe.Pointer(&sa), unsafe.Sizeof(sa)); err != nil {
			return netip.AddrPort{}, wrap(err, "SOL_IP, SO_ORIGINAL_DST")
		}
		port := int(sa.Port>>8) | int(sa.Port&0xff)<<8 // network byte order
		return netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), uint16(port)), nil
	}
	var sa unix.RawSockaddrInet6
	if err := getsockopt(fd, unix.SOL_IPV6, ip6tSOOriginalDst, unsafe.Pointer(&sa), unsafe.Sizeof(sa)); err != nil {
		return netip.AddrPort{}, wrap(err, "SOL_IPV6, IP6T_SO_ORIGINAL_DST")
	}
	port := int(sa.Port>>8) | int(sa.Port&0xff)<<8
	return netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), uint16(port)), nil
}

func wrap(err error, opt string) error {
	if errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ENOPROTOOPT) {
		return fmt.Errorf("getsockopt(%s): %w: %w", opt, ErrNotRedirected, err)
	}
	return fmt.Errorf("getsockopt(%s): %w", opt, err)
}

func getsockopt(fd, level, opt int, p unsafe.Pointer, size uintptr) error {
	l := uint32(size)
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), uintptr(opt), uintptr(p), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return syscall.Errno(e)
	}
	return nil
}
