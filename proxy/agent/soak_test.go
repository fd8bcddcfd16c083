package agent_test

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// load pushes constant traffic through addr (a capture listener forwarding
// to httpBackend): HTTP/1.1 keep-alive, HTTP/1.1 new connections, and long
// raw TCP streams. Every failure is recorded.
type load struct {
	addr              string
	dial              func(ctx context.Context, network, addr string) (net.Conn, error)
	stop              chan struct{}
	wg                sync.WaitGroup
	ok, streams, fail atomic.Int64
	mu                sync.Mutex
	errs              []string
}

func startLoad(addr string, keepAlive, newConn, streams int) *load {
	return startLoadVia((&net.Dialer{}).DialContext, addr, keepAlive, newConn, streams)
}

// startLoadVia is startLoad with a dialer (for example one inside a
// network namespace).
func startLoadVia(dial func(ctx context.Context, network, addr string) (net.Conn, error), addr string, keepAlive, newConn, streams int) *load {
	l := &load{addr: addr, dial: dial, stop: make(chan struct{})}
	for i := 0; i < keepAlive; i++ {
		l.run(func() error { return l.http(true) })
	}
	for i := 0; i < newConn; i++ {
		l.run(func() error { return l.http(false) })
	}
	for i := 0; i < streams; i++ {
		l.run(l.stream)
	}
	return l
}

func (l *load) run(fn func() error) {
	l.wg.Add(1)
	go func() {
		defer l.wg.Done()
		for {
			select {
			case <-l.stop:
				return
			default:
			}
			if err := fn(); err != nil {
				l.fail.Add(1)
				l.mu.Lock()
				if len(l.errs) < 20 {
					l.errs = append(l.errs, err.Error())
				}
				l.mu.Unlock()
			}
		}
	}()
}

var clients sync.Map

func (l *load) http(keepAlive bool) error {
	key := fmt.Sprintf("%p-%v", l, keepAlive)
	v, _ := clients.LoadOrStore(key, &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{DialContext: l.dial, DisableKeepAlives: !keepAlive, MaxIdleConnsPerHost: 4}})
	c := v.(*http.Client)
	for i := 0; i < 20; i++ {
		resp, err := c.Get("http://" + l.addr + "/")
		if err != nil {
			return err
		}
		n, err := io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if err != nil || n != 1024 || resp.StatusCode != 200 {
			return fmt.Errorf("response %d, %d bytes, %v", resp.StatusCode, n, err)
		}
		l.ok.Add(1)
		time.Sleep(2 * time.Millisecond)
	}
	return nil
}

// stream holds one TCP connection for about a second, echoing chunks.
func (l *load) stream() error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := l.dial(ctx, "tcp", l.addr)
	if err != nil {
		return fmt.Errorf("stream dial: %w", err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(15 * time.Second))
	br := bufio.NewReader(c)
	chunk := bytes.Repeat([]byte("S"), 1024)
	buf := make([]byte, len(chunk))
	for i := 0; i < 50; i++ {
		if _, err := c.Write(chunk); err != nil {
			return fmt.Errorf("stream write %d: %w", i, err)
		}
		if _, err := io.ReadFull(br, buf); err != nil {
			return fmt.Errorf("stream read %d: %w", i, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	_ = c.(*net.TCPConn).CloseWrite()
	if rest, err := io.ReadAll(br); err != nil || len(rest) != 0 {
		return fmt.Errorf("stream end: %d bytes, %w", len(rest), err)
	}
	l.streams.Add(1)
	return nil
}

func (l *load) finish(t *testing.T) {
	t.Helper()
	close(l.stop)
	l.wg.Wait()
	t.Logf("load: %d requests, %d streams completed, %d failures", l.ok.Load(), l.streams.Load(), l.fail.Load())
	if n := l.fail.Load(); n != 0 {
		t.Errorf("%d failures under load, first: %q", n, l.errs)
	}
}

// TestHotRestartSoak: constant keep-alive, new-connection and long-stream
// load through the outbound listener while the configuration changes N
// times by each route (POST /reload, SIGHUP, file change) and one bad config in the middle. Zero failures; never
// more than two generations; counters carried across generations.
func TestHotRestartSoak(t *testing.T) {
	if testing.Short() {
		t.Skip("soak: skipped under -short")
	}
	p := startAgent(t, httpBackend(t), "--drain-duration=5s")
	l := startLoad(p.outbound, 4, 2, 3)

	var maxGens atomic.Int64
	watchDone := make(chan struct{})
	go func() {
		defer close(watchDone)
		for {
			select {
			case <-l.stop:
				return
			case <-time.After(10 * time.Millisecond):
			}
			if n := int64(len(p.info(t).Generations)); n > maxGens.Load() {
				maxGens.Store(n)
			}
		}
	}()

	time.Sleep(300 * time.Millisecond)
	before := p.metric(t, `meshlet_proxy_connections_total{direction="outbound"}`)
	const n = 9
	for i := 0; i < n; i++ {
		switch i % 3 {
		case 0:
			if r := p.reload(t); r.Error != "" {
				t.Fatalf("reload %d: %s", i, r.Error)
			}
		case 1:
			if err := p.cmd.Process.Signal(syscall.SIGHUP); err != nil {
				t.Fatal(err)
			}
		case 2:
			if err := os.WriteFile(p.configPath, fmt.Appendf(nil, goodConfig, 11+i), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		time.Sleep(400 * time.Millisecond)
		if i == 4 {
			// A bad config mid-soak: rejected, the generation keeps serving.
			if err := os.WriteFile(p.configPath, []byte("apiVersion: meshlet.io/v1alpha1\nkind: ProxyConfig\ninbound:\n  maxConnections: -1\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			time.Sleep(400 * time.Millisecond)
			if r := p.reload(t); r.Error == "" {
				t.Errorf("bad config reload succeeded")
			}
			if err := os.WriteFile(p.configPath, fmt.Appendf(nil, goodConfig, 3), 0o644); err != nil {
				t.Fatal(err)
			}
			time.Sleep(400 * time.Millisecond)
		}
	}
	time.Sleep(500 * time.Millisecond)
	l.finish(t)
	<-watchDone

	info := p.info(t)
	t.Logf("agent: %+v", info)
	// Reloads arriving while two generations live coalesce, so fewer than
	// n+2 generations may have run.
	if info.ActiveGeneration < n/2 {
		t.Errorf("active generation %d after %d reloads", info.ActiveGeneration, n)
	}
	if m := maxGens.Load(); m > 2 {
		t.Errorf("saw %d live generations, want at most 2", m)
	}
	after := p.metric(t, `meshlet_proxy_connections_total{direction="outbound"}`)
	if after <= before {
		t.Errorf("connections counter went from %v to %v across generations", before, after)
	}
	if v := p.metric(t, `meshlet_agent_reloads_total{result="failure"}`); v < 1 {
		t.Errorf("reload failures = %v, want ≥ 1", v)
	}
	if l.streams.Load() == 0 || l.ok.Load() < 100 {
		t.Errorf("too little load went through: %d requests, %d streams", l.ok.Load(), l.streams.Load())
	}
}
