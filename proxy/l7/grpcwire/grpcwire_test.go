package grpcwire

import (
	"net/http"
	"testing"
	"time"
)

func TestTimeout(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"100m", 100 * time.Millisecond, true}, {"5S", 5 * time.Second, true}, {"2H", 2 * time.Hour, true},
		{"1M", time.Minute, true}, {"7u", 7 * time.Microsecond, true}, {"9n", 9, true},
		{"", 0, false}, {"m", 0, false}, {"10x", 0, false}, {"-1S", 0, false}, {"123456789S", 0, false},
	} {
		got, ok := ParseTimeout(tt.in)
		if got != tt.want || ok != tt.ok {
			t.Errorf("ParseTimeout(%q) = %v, %v; want %v, %v", tt.in, got, ok, tt.want, tt.ok)
		}
	}
	// Formatting rounds up and parses back to at least the duration.
	for _, d := range []time.Duration{0, -time.Second, time.Nanosecond, 1500 * time.Microsecond, 3 * time.Minute, 30 * time.Hour} {
		v := FormatTimeout(d)
		got, ok := ParseTimeout(v)
		if !ok || got < d || got <= 0 {
			t.Errorf("FormatTimeout(%v) = %q, parsed back %v, %v", d, v, got, ok)
		}
	}
}

func TestStatusAndIsGRPC(t *testing.T) {
	t.Parallel()
	if got := Status(http.Header{"Grpc-Status": {"5"}}); got != "5" {
		t.Errorf("trailers-only status %q", got)
	}
	if got := Status(http.Header{http.TrailerPrefix + "Grpc-Status": {"14"}}); got != "14" {
		t.Errorf("trailer status %q", got)
	}
	if got := Status(http.Header{}); got != "" {
		t.Errorf("no status: %q", got)
	}
	r, _ := http.NewRequest(http.MethodPost, "http://x/", nil)
	r.Header.Set("Content-Type", "application/grpc+proto")
	if !IsGRPC(r) {
		t.Error("application/grpc+proto is gRPC")
	}
	r.Header.Set("Content-Type", "application/json")
	if IsGRPC(r) {
		t.Error("application/json is not gRPC")
	}
}
