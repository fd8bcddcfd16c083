package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// Batch is the answer of the -serve mode's /run: what n calls of a URL got.
type Batch struct {
	// Calls is the number of calls made.
	Calls int `json:"calls"`
	// Servers counts the 2xx answers by the hostname the echo server
	// reported (its pod name).
	Servers map[string]int `json:"servers"`
	// Statuses counts the answers by HTTP status.
	Statuses map[string]int `json:"statuses"`
	// Errors counts the calls that got no HTTP answer, or a 2xx answer that
	// is not the echo server's; FirstErrors shows the first few.
	Errors      int      `json:"errors"`
	FirstErrors []string `json:"firstErrors,omitempty"`
}

// serve runs the load driver: GET /run?url=URL&n=N[&header=NAME:VALUE...]
// makes N calls one after another over kept-alive connections and answers
// a Batch in JSON. It lets a test drive traffic from inside a meshed pod
// (through its sidecar, with the cluster's DNS) without exec.
func serve(ctx context.Context, addr string, timeout time.Duration) error {
	client := &http.Client{Timeout: timeout, Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /run", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		url := q.Get("url")
		n, err := strconv.Atoi(q.Get("n"))
		if url == "" || err != nil || n < 1 || n > 100000 {
			http.Error(w, fmt.Sprintf("want url=URL and n=1..100000, got url=%q n=%q", url, q.Get("n")), http.StatusBadRequest)
			return
		}
		header := http.Header{}
		for _, h := range q["header"] {
			k, v, ok := strings.Cut(h, ":")
			if !ok || strings.TrimSpace(k) == "" {
				http.Error(w, fmt.Sprintf("header=%q: want NAME:VALUE", h), http.StatusBadRequest)
				return
			}
			header.Add(strings.TrimSpace(k), strings.TrimSpace(v))
		}
		b := Batch{Servers: map[string]int{}, Statuses: map[string]int{}}
		for i := 0; i < n && r.Context().Err() == nil; i++ {
			b.Calls++
			status, host, err := callOnce(r.Context(), client, url, header)
			if status != 0 {
				b.Statuses[strconv.Itoa(status)]++
			}
			switch {
			case err != nil:
				b.Errors++
				if len(b.FirstErrors) < 5 {
					b.FirstErrors = append(b.FirstErrors, err.Error())
				}
			case host != "":
				b.Servers[host]++
			}
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(b)
	})
	srv := &http.Server{Addr: addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	log.Printf("client: load driver serving on %s", addr)
	if err := srv.ListenAndServe(); err != nil && err != http.ErrServerClosed {
		return err
	}
	return nil
}

// callOnce GETs url with header. A 2xx answer yields the echo server's
// hostname; another status is no error (the caller counts it); no answer,
// or a 2xx that is not the echo server's JSON, is an error.
func callOnce(ctx context.Context, client *http.Client, url string, header http.Header) (status int, host string, err error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return 0, "", err
	}
	req.Header = header.Clone()
	resp, err := client.Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return resp.StatusCode, "", fmt.Errorf("reading body: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		return resp.StatusCode, "", nil
	}
	var r struct {
		Hostname string `json:"hostname"`
	}
	if err := json.Unmarshal(body, &r); err != nil || r.Hostname == "" {
		return resp.StatusCode, "", fmt.Errorf("status %d without the echo reply: %.200s", resp.StatusCode, body)
	}
	return resp.StatusCode, r.Hostname, nil
}
