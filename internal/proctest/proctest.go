// Package proctest holds what meshlet's tests share across packages: the
// switch that makes a test binary act as meshlet (for tests that fork real
// agent and proxy processes), loopback helpers, a log buffer safe for
// concurrent writers, and the backend the proxies under test talk to.
package proctest

import (
	"bufio"
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"strconv"
	"sync"
	"testing"
	"time"
)

// EnvExec set to "1" makes a test binary whose TestMain honours it behave as
// the meshlet binary (app.Main), so tests fork real `meshlet agent` and
// `meshlet proxy` processes from their own executable.
const EnvExec = "MESHLET_TEST_EXEC_MESHLET"

// FreePort returns a loopback address that was free a moment ago, for a
// child process to bind. It is taken below the kernel's ephemeral range
// (ip_local_port_range, 32768+ by default): a port the kernel handed out
// for :0 and got back is soon given to some test's outgoing connection as
// its source port, and the child's bind then fails ("address already in
// use", seen in parallel agent tests). Ports are not handed out twice by
// one test binary.
func FreePort(t testing.TB) string {
	t.Helper()
	freeMu.Lock()
	defer freeMu.Unlock()
	for range 1000 {
		port := 20000 + rand.IntN(12000)
		if freeUsed[port] {
			continue
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		ln.Close()
		freeUsed[port] = true
		return addr
	}
	t.Fatal("no free loopback port in 20000..31999")
	return ""
}

var (
	freeMu   sync.Mutex
	freeUsed = map[int]bool{}
)

// SyncBuf is a bytes.Buffer safe for concurrent writers (a child process's
// output copier, logger goroutines) and the test reading it.
type SyncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *SyncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *SyncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// HTTPGet is a GET with a 5 s timeout: the status and body, or 0 and the
// error's text.
func HTTPGet(url string) (int, string) {
	c := &http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return 0, err.Error()
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// Payload is what the backend answers every HTTP request with.
var Payload = bytes.Repeat([]byte("x"), 1024)

// RawHandler may take a backend connection by its first bytes (peeked, not
// consumed from br): it returns false to leave it to the HTTP server.
type RawHandler func(first []byte, c *net.TCPConn, br *bufio.Reader) bool

// ServeBackend serves on ln, until the test ends, a backend speaking two
// protocols on one port: each connection's first peek bytes go to raw,
// and connections raw leaves are HTTP/1.1, every request answered with
// Payload after its body is read.
func ServeBackend(t testing.TB, ln net.Listener, peek int, raw RawHandler) {
	t.Helper()
	hl := &handoff{ch: make(chan net.Conn, 128), addr: ln.Addr(), done: make(chan struct{})}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		_, _ = w.Write(Payload)
	})}
	go func() { _ = hs.Serve(hl) }()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				br := bufio.NewReader(c)
				first, err := br.Peek(peek)
				if err != nil {
					c.Close()
					return
				}
				if !raw(first, c.(*net.TCPConn), br) {
					hl.ch <- &peekedConn{Conn: c, r: br}
				}
			}()
		}
	}()
	t.Cleanup(func() { ln.Close(); close(hl.done); hs.Close() })
}

// peekedConn reads through the bufio.Reader that peeked at it.
type peekedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *peekedConn) Read(p []byte) (int, error) { return c.r.Read(p) }

// handoff is the http.Server's listener: connections ServeBackend hands it.
type handoff struct {
	ch   chan net.Conn
	addr net.Addr
	done chan struct{}
}

func (l *handoff) Accept() (net.Conn, error) {
	select {
	case c := <-l.ch:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}
func (l *handoff) Close() error   { return nil }
func (l *handoff) Addr() net.Addr { return l.addr }
