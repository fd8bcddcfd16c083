package manifest

import "strings"

// The YAML encoder keeps comments and key order but not every detail of the
// original text: it normalizes the spaces before a line comment and drops
// blank lines. restoreText aligns the encoder's output with the original
// document line by line (a Myers diff on lines compared by indentation and
// tokens) and takes the original text for every line that only differs in
// spacing, and puts back blank lines the encoder dropped. Lines injection
// added or removed are unaffected.

// maxDiffLines bounds the work of the alignment; larger documents keep the
// encoder's output as is.
const maxDiffLines = 20000

func normLine(s string) string {
	s = strings.TrimRight(s, " \t\r")
	indent := len(s) - len(strings.TrimLeft(s, " "))
	return s[:indent] + strings.Join(strings.Fields(s[indent:]), " ")
}

func splitLines(s string) []string {
	if s == "" {
		return nil
	}
	lines := strings.SplitAfter(s, "\n")
	if lines[len(lines)-1] == "" {
		lines = lines[:len(lines)-1]
	}
	return lines
}

// restoreText returns out with original formatting restored where the
// content is the same.
func restoreText(orig, out string) string {
	a, b := splitLines(orig), splitLines(out)
	if len(a)+len(b) > maxDiffLines {
		return out
	}
	na, nb := make([]string, len(a)), make([]string, len(b))
	for i, l := range a {
		na[i] = normLine(l)
	}
	for i, l := range b {
		nb[i] = normLine(l)
	}
	var sb strings.Builder
	sb.Grow(len(out) + len(orig)/8)
	for _, e := range diffLines(na, nb) {
		switch {
		case e.a >= 0 && e.b >= 0:
			l := a[e.a]
			if !strings.HasSuffix(l, "\n") && strings.HasSuffix(b[e.b], "\n") {
				l += "\n"
			}
			sb.WriteString(l)
		case e.b >= 0:
			sb.WriteString(b[e.b])
		case strings.TrimSpace(a[e.a]) == "":
			l := a[e.a]
			if !strings.HasSuffix(l, "\n") {
				l += "\n"
			}
			sb.WriteString(l)
		}
	}
	return sb.String()
}

// edit is one step of a line diff: a≥0 and b≥0 is a match, a<0 an insertion
// of b[b], b<0 a deletion of a[a].
type edit struct{ a, b int }

// diffLines is Myers' O(ND) diff, after matching the common prefix and
// suffix directly.
func diffLines(a, b []string) []edit {
	pre := 0
	for pre < len(a) && pre < len(b) && a[pre] == b[pre] {
		pre++
	}
	suf := 0
	for suf < len(a)-pre && suf < len(b)-pre && a[len(a)-1-suf] == b[len(b)-1-suf] {
		suf++
	}
	out := make([]edit, 0, len(b)+len(a)/4)
	for i := 0; i < pre; i++ {
		out = append(out, edit{i, i})
	}
	for _, e := range myers(a[pre:len(a)-suf], b[pre:len(b)-suf]) {
		if e.a >= 0 {
			e.a += pre
		}
		if e.b >= 0 {
			e.b += pre
		}
		out = append(out, e)
	}
	for i := suf; i > 0; i-- {
		out = append(out, edit{len(a) - i, len(b) - i})
	}
	return out
}

// myers is Myers' O(ND) diff; the trace keeps only the diagonals each step
// can reach.
func myers(a, b []string) []edit {
	n, m := len(a), len(b)
	maxD := n + m
	off := maxD + 1
	v := make([]int, 2*maxD+3)
	var trace [][]int
	var dEnd int
outer:
	for d := 0; d <= maxD; d++ {
		// v before step d is only read on diagonals -d..d.
		lo, hi := off-d, off+d+1
		trace = append(trace, append([]int(nil), v[lo:hi]...))
		for k := -d; k <= d; k += 2 {
			var x int
			if k == -d || (k != d && v[off+k-1] < v[off+k+1]) {
				x = v[off+k+1]
			} else {
				x = v[off+k-1] + 1
			}
			y := x - k
			for x < n && y < m && a[x] == b[y] {
				x++
				y++
			}
			v[off+k] = x
			if x >= n && y >= m {
				dEnd = d
				break outer
			}
		}
	}
	// Backtrack.
	var rev []edit
	x, y := n, m
	for d := dEnd; d > 0; d-- {
		snap := trace[d]
		vp := func(k int) int { return snap[k+d] }
		k := x - y
		var pk int
		if k == -d || (k != d && vp(k-1) < vp(k+1)) {
			pk = k + 1
		} else {
			pk = k - 1
		}
		px := vp(pk)
		py := px - pk
		for x > px && y > py {
			x--
			y--
			rev = append(rev, edit{x, y})
		}
		if x == px {
			y--
			rev = append(rev, edit{-1, y})
		} else {
			x--
			rev = append(rev, edit{x, -1})
		}
	}
	for x > 0 && y > 0 {
		x--
		y--
		rev = append(rev, edit{x, y})
	}
	out := make([]edit, len(rev))
	for i, e := range rev {
		out[len(rev)-1-i] = e
	}
	return out
}
