package h1

import (
	"bytes"
	"net/http"
	"net/url"
	"strconv"
	"strings"

	"golang.org/x/net/http/httpguts"
)

var crlfcrlf = []byte("\r\n\r\n")

// HeadEnd returns the index of the CRLFCRLF that ends the request head at
// the start of buf, or -1 when buf does not hold a whole head yet.
func HeadEnd(buf []byte) int { return bytes.Index(buf, crlfcrlf) }

// Plausible rejects at once what cannot become a request the codec
// parses (the HTTP/2 preface, TLS, binary), so such connections are handed
// over without waiting for a CRLFCRLF.
func Plausible(b []byte) bool {
	for _, ch := range b[:min(len(b), 16)] {
		if ch == ' ' {
			return true
		}
		if ch < 'A' || ch > 'Z' && ch != '-' && ch != '_' {
			return false
		}
	}
	return true
}

// Parser parses request heads into a request it reuses: the request, its
// URL and header map stay valid until the next Parse. The zero Parser is
// ready to use; it is not safe for concurrent use.
type Parser struct {
	req  http.Request
	url  url.URL
	hdr  http.Header
	vals []string
}

// Parse parses a complete head (request line and header fields, and the
// CRLFCRLF that HeadEnd finds) into a copy of tmpl (which carries
// the connection's context and TLS state) from the client at remote. For
// anything it does not take exactly as net/http would, it returns why (a
// handoff reason: http2, http1.0, upgrade, expect, transfer_encoding,
// large_body, other) and the caller hands the connection to net/http.
func (c *Parser) Parse(head []byte, tmpl *http.Request, remote string) (r *http.Request, clen int64, why string) {
	if c.hdr == nil {
		c.hdr = make(http.Header, 16)
	}
	// One string for the whole head: method, target, header names and
	// values are slices of it.
	s := string(head[:len(head)-4])
	line, rest, _ := strings.Cut(s, "\r\n")
	method, line, ok1 := strings.Cut(line, " ")
	target, proto, ok2 := strings.Cut(line, " ")
	switch {
	case proto == "HTTP/2.0" && method == "PRI":
		return nil, 0, "http2"
	case proto == "HTTP/1.0":
		return nil, 0, "http1.0"
	case !ok1 || !ok2 || proto != "HTTP/1.1" || method == "" || method == http.MethodConnect ||
		!httpguts.ValidHeaderFieldName(method) || len(target) == 0 || target[0] != '/':
		return nil, 0, "other"
	}
	c.url = url.URL{}
	path, query, hasQ := strings.Cut(target, "?")
	if plainPath(path) && printable(query) {
		c.url.Path, c.url.RawQuery, c.url.ForceQuery = path, query, hasQ && query == ""
	} else {
		// Escapes and characters url.URL keeps a RawPath for: its parser.
		u, err := url.ParseRequestURI(target)
		if err != nil {
			return nil, 0, "other"
		}
		c.url = *u
	}
	clear(c.hdr)
	n := strings.Count(rest, "\r\n") + 1
	if cap(c.vals) < n {
		c.vals = make([]string, n)
	}
	vals := c.vals[:n]
	clear(vals)
	host, hostSeen := "", false
	clen = 0
	clenSeen := false
	closeReq := false
	i := 0
	for rest != "" {
		var fl string
		fl, rest, _ = strings.Cut(rest, "\r\n")
		name, value, found := strings.Cut(fl, ":")
		if !found || !httpguts.ValidHeaderFieldName(name) {
			return nil, 0, "other" // includes obs-fold and space before the colon
		}
		value = strings.Trim(value, " \t")
		if !httpguts.ValidHeaderFieldValue(value) {
			return nil, 0, "other"
		}
		key := canonicalHeader(name)
		switch key {
		case "Host":
			if hostSeen || !httpguts.ValidHostHeader(value) {
				return nil, 0, "other"
			}
			host, hostSeen = value, true
			continue
		case "Content-Length":
			v, err := strconv.ParseInt(value, 10, 64)
			if clenSeen || err != nil || v < 0 || value[0] == '+' {
				return nil, 0, "other"
			}
			if v > MaxBody {
				return nil, 0, "large_body"
			}
			clen, clenSeen = v, true
		case "Transfer-Encoding":
			return nil, 0, "transfer_encoding"
		case "Upgrade", "Http2-Settings":
			return nil, 0, "upgrade"
		case "Expect":
			return nil, 0, "expect"
		case "Connection":
			for _, tok := range strings.Split(value, ",") {
				tok = strings.TrimSpace(tok)
				switch {
				case strings.EqualFold(tok, "close"):
					closeReq = true
				case strings.EqualFold(tok, "upgrade"):
					return nil, 0, "upgrade"
				}
			}
		}
		vals[i] = value
		if prev, dup := c.hdr[key]; dup {
			c.hdr[key] = append(prev, value)
		} else {
			c.hdr[key] = vals[i : i+1 : i+1]
		}
		i++
	}
	if !hostSeen {
		return nil, 0, "other"
	}
	c.req = *tmpl
	r = &c.req
	r.Method = method
	r.URL = &c.url
	r.Proto, r.ProtoMajor, r.ProtoMinor = "HTTP/1.1", 1, 1
	r.Header = c.hdr
	r.Host = host
	r.ContentLength = clen
	r.Close = closeReq
	r.RemoteAddr = remote
	r.RequestURI = target
	return r, clen, ""
}

// plainPaths marks the bytes a path may hold and still be its own escaped
// form (url.URL then needs no RawPath).
var plainPaths = func() (t [256]bool) {
	for _, c := range "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~/" {
		t[c] = true
	}
	return t
}()

func plainPath(p string) bool {
	for i := 0; i < len(p); i++ {
		if !plainPaths[p[i]] {
			return false
		}
	}
	return true
}

// printable: a query net/http would take as is (no space, control or
// non-ASCII byte, no fragment).
func printable(q string) bool {
	for i := 0; i < len(q); i++ {
		if c := q[i]; c <= ' ' || c >= 0x7f || c == '#' {
			return false
		}
	}
	return true
}

// commonHeaders maps header names as clients send them to their canonical
// form without allocating.
var commonHeaders = func() map[string]string {
	m := map[string]string{}
	for _, k := range []string{"Accept", "Accept-Encoding", "Accept-Language", "Authorization", "Cache-Control",
		"Connection", "Content-Length", "Content-Type", "Cookie", "Host", "If-Modified-Since", "If-None-Match",
		"Origin", "Referer", "Te", "Trailer", "Transfer-Encoding", "Upgrade", "User-Agent", "Expect",
		"X-Forwarded-For", "X-Forwarded-Proto", "X-Request-Id", "Traceparent", "Tracestate", "B3",
		"X-B3-Traceid", "X-B3-Spanid", "X-B3-Parentspanid", "X-B3-Sampled", "Grpc-Timeout", "Baggage",
		"Keep-Alive", "Pragma", "Range", "Http2-Settings", "X-Envoy-Original-Path", "Idempotency-Key"} {
		m[k] = k
		m[strings.ToLower(k)] = k
	}
	return m
}()

func canonicalHeader(name string) string {
	if k, ok := commonHeaders[name]; ok {
		return k
	}
	return http.CanonicalHeaderKey(name)
}
