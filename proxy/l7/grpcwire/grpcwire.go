// Package grpcwire holds the gRPC-over-HTTP/2 conventions the L7 engine
// reads and writes: the content type that marks a gRPC request, the
// grpc-timeout header's format, and where a response carries its status.
package grpcwire

import (
	"net/http"
	"strconv"
	"strings"
	"time"
)

// IsGRPC reports whether r is a gRPC request (content type application/grpc
// or one of its +proto, +json variants).
func IsGRPC(r *http.Request) bool {
	return strings.HasPrefix(r.Header.Get("Content-Type"), "application/grpc")
}

// ParseTimeout parses a grpc-timeout header value ("100m", "5S", …): at
// most 8 digits and a unit (H, M, S, m, u, n).
func ParseTimeout(v string) (time.Duration, bool) {
	if len(v) < 2 || len(v) > 9 {
		return 0, false
	}
	n, err := strconv.ParseInt(v[:len(v)-1], 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	var unit time.Duration
	switch v[len(v)-1] {
	case 'H':
		unit = time.Hour
	case 'M':
		unit = time.Minute
	case 'S':
		unit = time.Second
	case 'm':
		unit = time.Millisecond
	case 'u':
		unit = time.Microsecond
	case 'n':
		unit = time.Nanosecond
	default:
		return 0, false
	}
	return time.Duration(n) * unit, true
}

// FormatTimeout formats d as a grpc-timeout value, rounded up so the
// upstream never gets more time than is left (a spent deadline is "1n").
func FormatTimeout(d time.Duration) string {
	if d <= 0 {
		return "1n"
	}
	// The value has at most 8 digits: take the finest unit that fits.
	for _, u := range []struct {
		d    time.Duration
		unit string
	}{{time.Microsecond, "u"}, {time.Millisecond, "m"}, {time.Second, "S"}, {time.Minute, "M"}} {
		if d/u.d < 1e8-1 {
			return strconv.FormatInt(int64(d/u.d)+1, 10) + u.unit
		}
	}
	return strconv.FormatInt(min(int64(d/time.Hour)+1, 1e8-1), 10) + "H"
}

// Status reads the gRPC status a response carried: in its trailers, or in
// the headers of a trailers-only response; "" when there is none.
func Status(h http.Header) string {
	if v := h.Get("Grpc-Status"); v != "" {
		return v
	}
	if v := h.Get(http.TrailerPrefix + "Grpc-Status"); v != "" {
		return v
	}
	return ""
}
