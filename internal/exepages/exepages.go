// Package exepages gives back the pages of the process's own executable
// that start-up touched and serving does not use.
//
// meshlet is one binary for every subcommand, and Go runs the initialiser
// of every package linked into it before main, whatever the subcommand: a
// proxy generation walks through the init code and read-only data of the
// webhook, the control plane, client-go and the Envoy protos it never calls.
// Each of those page faults maps the page (and the kernel maps its
// neighbours with it), so after start-up tens of MiB of the binary stay
// mapped and count in the process's RSS and PSS although nothing reads them
// again. Release unmaps them; the page cache keeps them, so a page that is
// used again is mapped back by a minor fault, without I/O.
package exepages

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"reflect"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Release drops this process's mappings of the non-writable segments of its
// executable (text and read-only data) with madvise(MADV_DONTNEED) and
// returns how many bytes of address space it covered. Only pages that can
// never have been written are dropped: for a private file mapping that was
// never written, MADV_DONTNEED discards nothing but the mapping, and the next
// access maps the file's page again. Writable segments (initialised data)
// are left alone.
func Release() (int64, error) {
	return release("/proc/self/maps", reflect.ValueOf(Release).Pointer())
}

// segment is one mapping of the executable.
type segment struct {
	start, end uintptr
}

func release(mapsPath string, pc uintptr) (int64, error) {
	segs, err := readOnlySegments(mapsPath, pc)
	if err != nil {
		return 0, err
	}
	var total int64
	var errs []error
	for _, s := range segs {
		if _, _, e := unix.Syscall(unix.SYS_MADVISE, s.start, s.end-s.start, unix.MADV_DONTNEED); e != 0 {
			errs = append(errs, fmt.Errorf("madvise(%#x, %d, MADV_DONTNEED): %w", s.start, s.end-s.start, e))
			continue
		}
		total += int64(s.end - s.start)
	}
	return total, errors.Join(errs...)
}

// mapping is one line of /proc/PID/maps.
type mapping struct {
	segment
	perms string
	// file is device, inode and path: what names the mapped file.
	file string
}

// readOnlySegments lists the mappings in mapsPath (the format of
// /proc/PID/maps) that map, not writable and private, the same file as the
// mapping holding address pc (the executable's text).
func readOnlySegments(mapsPath string, pc uintptr) ([]segment, error) {
	maps, err := readMaps(mapsPath)
	if err != nil {
		return nil, err
	}
	exe := ""
	for _, m := range maps {
		if m.start <= pc && pc < m.end {
			exe = m.file
			break
		}
	}
	if exe == "" || strings.HasSuffix(exe, " 0") {
		return nil, fmt.Errorf("reading mappings: no file mapping holds the executable's text (%#x)", pc)
	}
	var segs []segment
	for _, m := range maps {
		if m.file == exe && m.perms[1] != 'w' && m.perms[3] == 'p' {
			segs = append(segs, m.segment)
		}
	}
	return segs, nil
}

func readMaps(path string) ([]mapping, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading mappings: %w", err)
	}
	defer f.Close()
	var maps []mapping
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		// address perms offset dev inode [path]
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 || len(fields[1]) < 4 {
			continue
		}
		lo, hi, ok := strings.Cut(fields[0], "-")
		if !ok {
			return nil, fmt.Errorf("reading mappings: bad address range %q", fields[0])
		}
		start, err1 := strconv.ParseUint(lo, 16, 64)
		end, err2 := strconv.ParseUint(hi, 16, 64)
		if err1 != nil || err2 != nil || end <= start {
			return nil, fmt.Errorf("reading mappings: bad address range %q", fields[0])
		}
		maps = append(maps, mapping{
			segment: segment{uintptr(start), uintptr(end)},
			perms:   fields[1],
			file:    strings.Join(fields[3:], " "),
		})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading mappings: %w", err)
	}
	return maps, nil
}
