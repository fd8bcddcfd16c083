package exepages

import (
	"bufio"
	"os"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// written lives in the executable's initialised data (a writable, private
// file mapping): Release must keep what the process wrote there.
var written = 7

// exeRSS sums the Rss of the executable's mappings in /proc/self/smaps,
// split by writable and not.
func exeRSS(t *testing.T) (readOnly, writable int64) {
	t.Helper()
	maps, err := readMaps("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	pc := reflect.ValueOf(Release).Pointer()
	exe := ""
	for _, m := range maps {
		if m.start <= pc && pc < m.end {
			exe = m.file
		}
	}
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var cur *mapping
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if fields := strings.Fields(line); len(fields) >= 5 && strings.Contains(fields[0], "-") && !strings.HasSuffix(fields[0], ":") {
			cur = nil
			lo, _, _ := strings.Cut(fields[0], "-")
			start, _ := strconv.ParseUint(lo, 16, 64)
			for i := range maps {
				if maps[i].start == uintptr(start) {
					cur = &maps[i]
				}
			}
			continue
		}
		if cur == nil || cur.file != exe || !strings.HasPrefix(line, "Rss:") {
			continue
		}
		kb, _ := strconv.ParseInt(strings.Fields(line)[1], 10, 64)
		if cur.perms[1] == 'w' {
			writable += kb
		} else {
			readOnly += kb
		}
	}
	return readOnly, writable
}

func TestReleaseUnmapsTextKeepsData(t *testing.T) {
	written = 42
	ro0, _ := exeRSS(t)
	n, err := Release()
	if err != nil {
		t.Fatal(err)
	}
	ro1, _ := exeRSS(t)
	t.Logf("released %d KiB of address space; read-only RSS %d → %d KiB", n>>10, ro0, ro1)
	if n == 0 {
		t.Fatal("no segment released")
	}
	// The test binary is small and the test itself (and the runtime's
	// other threads) map back much of what it runs, a 64 KiB fault-around
	// at a time; without Release the figure only grows.
	if ro1 >= ro0*9/10 {
		t.Errorf("read-only RSS of the executable %d KiB before, %d KiB after Release: want a tenth less at least", ro0, ro1)
	}
	if written != 42 {
		t.Errorf("a variable written before Release reads %d after: the writable data segment was discarded", written)
	}
	// Code runs on: the page cache maps the pages back.
	if got := strings.Repeat("ab", 3); got != "ababab" {
		t.Errorf("after Release: %q", got)
	}
}

func TestReadOnlySegmentsFindsTheExecutable(t *testing.T) {
	dir := t.TempDir()
	maps := dir + "/maps"
	content := strings.Join([]string{
		"00400000-00500000 r-xp 00000000 fe:00 1234 /usr/bin/meshlet",
		"00500000-00600000 r--p 00100000 fe:00 1234 /usr/bin/meshlet",
		"00600000-00610000 rw-p 00200000 fe:00 1234 /usr/bin/meshlet",
		"00610000-00620000 rw-p 00000000 00:00 0",
		"7f0000000000-7f0000001000 r--p 00000000 fe:00 99 /usr/lib/locale/C.utf8/LC_CTYPE",
		"7f0000002000-7f0000003000 r--s 00000000 fe:00 1234 /usr/bin/meshlet",
		"7ffd00000000-7ffd00001000 r-xp 00000000 00:00 0 [vdso]",
	}, "\n") + "\n"
	if err := os.WriteFile(maps, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
	segs, err := readOnlySegments(maps, 0x401000)
	if err != nil {
		t.Fatal(err)
	}
	want := []segment{{0x400000, 0x500000}, {0x500000, 0x600000}}
	if !reflect.DeepEqual(segs, want) {
		t.Errorf("segments %#v, want %#v (text and read-only data only: not data, not anonymous, not shared, not other files)", segs, want)
	}
	if _, err := readOnlySegments(maps, 0x610100); err == nil || !strings.Contains(err.Error(), "0x610100") {
		t.Errorf("an address in an anonymous mapping: err %v, want one naming the address", err)
	}
}
