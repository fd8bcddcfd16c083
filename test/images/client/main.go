// Command client is the demo HTTP client of meshlet's quickstart and e2e
// tests: it calls a URL every interval and prints one line per attempt
// ("ok 200 <server hostname>" or "error ..."). With -count N it exits after N
// successful calls (status 0), which makes it a Job's workload. With -serve
// ADDR it is instead a load driver that makes batches of calls on request
// (see serve).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	url := flag.String("url", "http://echo:8080/", "URL to call")
	interval := flag.Duration("interval", time.Second, "pause between calls")
	count := flag.Int("count", 0, "exit 0 after this many successful calls (0: run forever)")
	timeout := flag.Duration("timeout", 5*time.Second, "timeout of one call")
	keepAlive := flag.Bool("keepalive", false, "reuse connections (default: a new TCP connection per call, so every call shows in the proxies' connection counters)")
	serveAddr := flag.String("serve", "", "serve GET /run?url=URL&n=N[&header=NAME:VALUE] on this address (a load driver) instead of calling -url")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if *serveAddr != "" {
		if err := serve(ctx, *serveAddr, *timeout); err != nil {
			fmt.Fprintf(os.Stderr, "client: %v\n", err)
			os.Exit(1)
		}
		return
	}
	client := &http.Client{Timeout: *timeout, Transport: &http.Transport{DisableKeepAlives: !*keepAlive}}
	ok := 0
	for attempt := 1; ; attempt++ {
		host, err := call(ctx, client, *url)
		if err != nil {
			fmt.Printf("error attempt=%d %v\n", attempt, err)
		} else {
			ok++
			fmt.Printf("ok 200 attempt=%d server=%s\n", attempt, host)
			if *count > 0 && ok >= *count {
				return
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(*interval):
		}
	}
}

// call GETs url and returns the hostname the echo server reported.
func call(ctx context.Context, client *http.Client, url string) (string, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return "", err
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return "", fmt.Errorf("reading body: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("status %d: %.200s", resp.StatusCode, body)
	}
	var r struct {
		Hostname string `json:"hostname"`
	}
	if err := json.Unmarshal(body, &r); err != nil {
		return "", fmt.Errorf("decoding echo reply: %w", err)
	}
	return r.Hostname, nil
}
