package upstream

import (
	"bufio"
	"bytes"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// The HTTP/1.1 fast path's own request writer and response head parser.
//
// http.Request.Write and http.ReadResponse cost about 30 allocations per
// request on this path (a transfer writer, formatted lines, sorted header
// keys; textproto's line reader, a map entry, a []string and a string per
// header, a LimitReader and body wrapper) — a third of what an L7 hop
// allocated (docs/benchmarks.md). writeRequest writes the same bytes as
// Request.Write for the requests canServe accepts, and parseResponse takes
// the common response head — HTTP/1.1, a final status, Content-Length, no
// Transfer-Encoding — exactly as ReadResponse would; anything else goes to
// net/http, with nothing consumed. TestH1WireMatchesNetHTTP compares both
// with net/http's own results.

// writeRequest writes req (with body, already buffered) to bw as
// http.Request.Write would; false means req is not one it writes (the
// caller uses Request.Write, which reports the error if there is one).
func writeRequest(bw *bufio.Writer, req *http.Request, body []byte, keys *[]string) bool {
	host := req.Host
	if host == "" && req.URL != nil {
		host = req.URL.Host
	}
	u := req.URL
	if u == nil || u.Opaque != "" || host == "" || !asciiPrintable(host) || !httpguts.ValidHostHeader(host) ||
		strings.IndexByte(host, '%') >= 0 || len(req.TransferEncoding) > 0 || req.Trailer != nil {
		return false
	}
	path := u.EscapedPath()
	if path == "" {
		path = "/"
	}
	if containsCTL(path) || containsCTL(u.RawQuery) {
		return false
	}
	method := req.Method
	if method == "" {
		method = http.MethodGet
	}
	h := req.Header
	// Values net/http would rewrite (line breaks, surrounding white space)
	// are rare: leave them to it.
	*keys = (*keys)[:0]
	for k, vs := range h {
		for _, v := range vs {
			if !cleanValue(v) {
				return false
			}
		}
		if !reqWriteExcluded(k) {
			*keys = append(*keys, k)
		}
	}
	_, _ = bw.WriteString(method)
	_ = bw.WriteByte(' ')
	_, _ = bw.WriteString(path)
	if u.ForceQuery || u.RawQuery != "" {
		_ = bw.WriteByte('?')
		_, _ = bw.WriteString(u.RawQuery)
	}
	_, _ = bw.WriteString(" HTTP/1.1\r\nHost: ")
	_, _ = bw.WriteString(host)
	_, _ = bw.WriteString("\r\n")
	if ua, ok := h["User-Agent"]; !ok {
		_, _ = bw.WriteString("User-Agent: Go-http-client/1.1\r\n")
	} else if len(ua) > 0 && ua[0] != "" {
		writeHeaderLine(bw, "User-Agent", ua[0])
	}
	if req.Close && !httpguts.HeaderValuesContainsToken(h["Connection"], "close") {
		_, _ = bw.WriteString("Connection: close\r\n")
	}
	switch n := len(body); {
	case n > 0:
		_, _ = bw.WriteString("Content-Length: ")
		_, _ = bw.Write(strconv.AppendInt(bw.AvailableBuffer(), int64(n), 10)) // no allocation
		_, _ = bw.WriteString("\r\n")
	case method == http.MethodPost || method == http.MethodPut || method == http.MethodPatch:
		// net/http sends a zero length for these ("many servers expect one").
		_, _ = bw.WriteString("Content-Length: 0\r\n")
	}
	slices.Sort(*keys)
	for _, k := range *keys {
		if !httpguts.ValidHeaderFieldName(k) {
			continue
		}
		for _, v := range h[k] {
			writeHeaderLine(bw, k, v)
		}
	}
	_, _ = bw.WriteString("\r\n")
	_, _ = bw.Write(body)
	return true
}

func writeHeaderLine(bw *bufio.Writer, k, v string) {
	_, _ = bw.WriteString(k)
	_, _ = bw.WriteString(": ")
	_, _ = bw.WriteString(v)
	_, _ = bw.WriteString("\r\n")
}

// reqWriteExcluded: the headers Request.Write writes itself or drops.
func reqWriteExcluded(k string) bool {
	switch k {
	case "Host", "User-Agent", "Content-Length", "Transfer-Encoding", "Trailer":
		return true
	}
	return false
}

// cleanValue: v goes out as is (net/http replaces CR and LF with spaces and
// trims white space around the value).
func cleanValue(v string) bool {
	if v == "" {
		return true
	}
	if isWS(v[0]) || isWS(v[len(v)-1]) {
		return false
	}
	return strings.IndexByte(v, '\r') < 0 && strings.IndexByte(v, '\n') < 0
}

func isWS(c byte) bool { return c == ' ' || c == '\t' || c == '\r' || c == '\n' }

func containsCTL(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < ' ' || c == 0x7f {
			return true
		}
	}
	return false
}

func asciiPrintable(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c >= 0x7f {
			return false
		}
	}
	return true
}

// responseHead returns the complete response head at the start of br's
// buffer (reading more while it is incomplete), or ok false when the head is
// not one parseResponse takes or could not be read: the caller then uses
// http.ReadResponse on the same bytes. err is set only when nothing at all
// arrived (what ReadResponse would return for it).
func responseHead(br *bufio.Reader) (head []byte, ok bool, err error) {
	if _, err := br.Peek(1); err != nil {
		if br.Buffered() == 0 {
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return nil, false, err
		}
		return nil, false, nil
	}
	for {
		buf, _ := br.Peek(br.Buffered())
		// Only CRLF line ends: a bare LF (which net/http accepts) anywhere
		// in the head sends it to net/http.
		if j := bytes.Index(buf, lflf); j >= 0 {
			if i := bytes.Index(buf, crlfcrlf); i < 0 || j < i {
				return nil, false, nil
			}
		}
		if i := bytes.Index(buf, crlfcrlf); i >= 0 {
			return buf[:i+4], true, nil
		}
		if len(buf) >= br.Size() {
			return nil, false, nil
		}
		if _, err := br.Peek(len(buf) + 1); err != nil {
			return nil, false, nil
		}
	}
}

var (
	crlfcrlf = []byte("\r\n\r\n")
	lflf     = []byte("\n\n")
)

// parseResponse parses a head responseHead returned into the response to
// req; nil when it is not in the fast path's shape. The returned length is
// the response's Content-Length. The header strings are slices of one copy
// of the head.
func parseResponse(head []byte, req *http.Request) (*http.Response, int64) {
	if req.Method == http.MethodHead || len(head) < 16 {
		return nil, 0
	}
	s := string(head[:len(head)-4])
	line, rest, _ := strings.Cut(s, "\r\n")
	status, ok := strings.CutPrefix(line, "HTTP/1.1 ")
	if !ok {
		return nil, 0
	}
	status = strings.TrimLeft(status, " ")
	if len(status) < 3 || len(status) > 3 && status[3] != ' ' || containsCTL(status) {
		return nil, 0
	}
	code := 0
	for i := 0; i < 3; i++ {
		c := status[i]
		if c < '0' || c > '9' {
			return nil, 0
		}
		code = code*10 + int(c-'0')
	}
	if code < 200 || code == http.StatusNoContent || code == http.StatusNotModified {
		return nil, 0
	}
	// Count the fields first: one map and one []string of the right size.
	n := 0
	if rest != "" {
		n = strings.Count(rest, "\r\n") + 1
	}
	hdr := make(http.Header, n)
	vals := make([]string, n)
	clen := int64(-1)
	for i := 0; rest != ""; i++ {
		var kv string
		kv, rest, _ = strings.Cut(rest, "\r\n")
		k, v, ok := strings.Cut(kv, ":")
		if !ok || !httpguts.ValidHeaderFieldName(k) {
			return nil, 0
		}
		v = strings.Trim(v, " \t")
		for j := 0; j < len(v); j++ {
			if c := v[j]; c < ' ' && c != '\t' || c == 0x7f {
				return nil, 0
			}
		}
		k = http.CanonicalHeaderKey(k) // no allocation when already canonical
		switch k {
		case "Content-Length":
			if clen >= 0 || v == "" || len(v) > 18 {
				return nil, 0
			}
			var l int64
			for j := 0; j < len(v); j++ {
				if v[j] < '0' || v[j] > '9' {
					return nil, 0
				}
				l = l*10 + int64(v[j]-'0')
			}
			clen = l
		case "Transfer-Encoding", "Connection", "Trailer", "Pragma":
			// Framing, connection management and net/http's Pragma fix-up:
			// net/http's reading.
			return nil, 0
		}
		vals[i] = v
		if prev, dup := hdr[k]; dup {
			hdr[k] = append(prev, v)
		} else {
			hdr[k] = vals[i : i+1 : i+1]
		}
	}
	if clen < 0 {
		return nil, 0
	}
	return &http.Response{
		Status:        status,
		StatusCode:    code,
		Proto:         "HTTP/1.1",
		ProtoMajor:    1,
		ProtoMinor:    1,
		Header:        hdr,
		ContentLength: clen,
		Request:       req,
	}, clen
}
