package sniff

import (
	"bytes"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

func TestClassify(t *testing.T) {
	t.Parallel()
	long := "GET /" + strings.Repeat("a", 200)
	tests := []struct {
		name string
		in   string
		want Protocol
		r    Reason
		done bool
	}{
		{"empty", "", TCP, "", false},
		{"h1 get", "GET / HTTP/1.1\r\nHost: x\r\n\r\n", HTTP1, ReasonMatched, true},
		{"h1.0 lf only", "HEAD /x HTTP/1.0\n", HTTP1, ReasonMatched, true},
		{"h1 custom method", "PROPFIND /a HTTP/1.1\r\n", HTTP1, ReasonMatched, true},
		{"h1 partial", "GET /index.html HT", TCP, "", false},
		{"h1 long line at budget", long, HTTP1, ReasonLongLine, true},
		{"h2 preface", Preface + "\x00\x00", HTTP2, ReasonMatched, true},
		{"h2 partial", Preface[:10], TCP, "", false},
		{"pri but h1 line", "PRI * HTTP/1.1\r\n", HTTP1, ReasonMatched, true},
		{"tls hello", "\x16\x03\x01\x02\x00\x01", TCP, ReasonMismatch, true},
		{"mysql-ish binary", "\x00\x01\x02", TCP, ReasonMismatch, true},
		{"leading space", " GET / HTTP/1.1\r\n", TCP, ReasonMismatch, true},
		{"http/2 version in h1 line", "GET / HTTP/2.0\r\n", TCP, ReasonMismatch, true},
		{"no version", "GET /\r\n", TCP, ReasonMismatch, true},
		{"redis", "*1\r\n$4\r\nPING\r\n", TCP, ReasonMismatch, true},
		{"method too long", strings.Repeat("A", 40), TCP, ReasonMismatch, true},
		{"ctl in target", "GET /\x01", TCP, ReasonMismatch, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p, r, done := Classify([]byte(tt.in), 64)
			if tt.name == "h1 long line at budget" {
				p, r, done = Classify([]byte(tt.in), len(tt.in))
			}
			if p != tt.want || r != tt.r || done != tt.done {
				t.Errorf("Classify(%q) = %v,%q,%v; want %v,%q,%v", tt.in, p, r, done, tt.want, tt.r, tt.done)
			}
		})
	}
}

// pipeConn returns a loopback TCP pair (real sockets: deadlines behave as in production).
func pipeConn(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ch := make(chan net.Conn, 1)
	go func() {
		c, _ := ln.Accept()
		ch <- c
	}()
	client, err = net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	server = <-ch
	t.Cleanup(func() { client.Close(); server.Close() })
	return client, server
}

func TestDetectReplaysAndCounts(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		send   []string // chunks written with small pauses
		close  bool
		want   Protocol
		reason Reason
	}{
		{"h1 in pieces", []string{"GE", "T /a HTTP/1.1\r", "\nHost: a\r\n\r\n"}, false, HTTP1, ReasonMatched},
		{"h2 preface split", []string{Preface[:5], Preface[5:] + "rest"}, false, HTTP2, ReasonMatched},
		{"server-first (silent client)", nil, false, TCP, ReasonTimeout},
		{"partial then silent", []string{"GET /x"}, false, TCP, ReasonTimeout},
		{"binary", []string{"\x16\x03\x01hello"}, false, TCP, ReasonMismatch},
		{"eof", []string{"GE"}, true, TCP, ReasonEOF},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			d := NewDetector(Options{Timeout: 200 * time.Millisecond})
			client, server := pipeConn(t)
			go func() {
				for _, s := range tc.send {
					client.Write([]byte(s))
					time.Sleep(20 * time.Millisecond)
				}
				if tc.close {
					client.(*net.TCPConn).CloseWrite()
				}
			}()
			res, c := d.Detect(server)
			if res.Protocol != tc.want || res.Reason != tc.reason {
				t.Fatalf("Detect = %+v; want %v/%s", res, tc.want, tc.reason)
			}
			// The conn replays everything: after the sender is done, all bytes are readable.
			want := strings.Join(tc.send, "")
			got := make([]byte, len(want))
			c.SetReadDeadline(time.Now().Add(2 * time.Second))
			if _, err := io.ReadFull(c, got); err != nil || string(got) != want {
				t.Fatalf("replayed %q (%v); want %q", got, err, want)
			}
			if n := float64(d.outcomes.WithLabelValues(tc.want.String(), string(tc.reason)).Value()); n != 1 {
				t.Errorf("outcome counter = %v; want 1", n)
			}
		})
	}
}

func TestDetectBuffered(t *testing.T) {
	t.Parallel()
	client, server := pipeConn(t)
	client.Write([]byte("\x00\x01binary"))
	res, c := NewDetector(Options{Timeout: time.Second}).Detect(server)
	if res.Protocol != TCP {
		t.Fatalf("got %v", res)
	}
	if b := c.Buffered(); !bytes.HasPrefix([]byte("\x00\x01binary"), b) || len(b) == 0 {
		t.Fatalf("Buffered = %q", b)
	}
	if b := c.Buffered(); len(b) != 0 {
		t.Fatalf("second Buffered = %q; want empty", b)
	}
	if c.Raw() != server {
		t.Fatal("Raw is not the underlying conn")
	}
}

// FuzzClassify checks Classify never panics, is monotone (a decided prefix
// stays decided the same way when more bytes follow, except for the
// budget-driven long-line case), and always decides at the budget.
func FuzzClassify(f *testing.F) {
	for _, s := range []string{"", "GET / HTTP/1.1\r\n", Preface, Preface[:7], "PRI * HTTP/1.1\r\n",
		"\x16\x03\x01", "POST /a?b=c HTTP/1.0\n", "GET /" + strings.Repeat("x", 100), "A B C\r\n"} {
		f.Add([]byte(s), []byte("\r\nmore"))
	}
	f.Fuzz(func(t *testing.T, a, more []byte) {
		const budget = 128
		if len(a) > budget {
			a = a[:budget]
		}
		p, r, done := Classify(a, budget)
		if len(a) >= budget && !done {
			t.Fatalf("undecided at budget: %q", a)
		}
		if !done {
			return
		}
		if p == TCP && r == "" {
			t.Fatalf("decided without reason: %q", a)
		}
		b := append(append([]byte{}, a...), more...)
		if len(b) > budget {
			b = b[:budget]
		}
		p2, _, done2 := Classify(b, budget)
		if r != ReasonLongLine && (!done2 || p2 != p) {
			t.Fatalf("Classify(%q)=%v but Classify(%q)=%v,%v", a, p, b, p2, done2)
		}
	})
}
