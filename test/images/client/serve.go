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
	// Echoed counts the 2xx echo replies by the value of the request header
	// named by echoHeader as the echo server received it ("" when it got
	// none, several values joined by ", "): what the sidecars added.
	Echoed map[string]int `json:"echoed,omitempty"`
	// Bodies counts the answers that are not 2xx by their body (trimmed,
	// at most 200 bytes): a proxy's denial says why.
	Bodies map[string]int `json:"bodies,omitempty"`
}

// serve runs the load driver: GET
// /run?url=URL&n=N[&method=M][&header=NAME:VALUE...][&echoHeader=NAME]
// makes N calls (method M, default GET) one after another over kept-alive
// connections and answers a Batch in JSON. It lets a test drive traffic
// from inside a pod (through its sidecar when it has one, with the
// cluster's DNS) without exec.
func serve(ctx context.Context, addr string, timeout time.Duration) error {
	client := &http.Client{Timeout: timeout, Transport: &http.Transport{MaxIdleConnsPerHost: 4}}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /run", runHandler(client))
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

// runHandler answers /run with the calls made by client.
func runHandler(client *http.Client) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		url := q.Get("url")
		n, err := strconv.Atoi(q.Get("n"))
		if url == "" || err != nil || n < 1 || n > 100000 {
			http.Error(w, fmt.Sprintf("want url=URL and n=1..100000, got url=%q n=%q", url, q.Get("n")), http.StatusBadRequest)
			return
		}
		method := q.Get("method")
		if method == "" {
			method = http.MethodGet
		}
		if !validMethod(method) {
			http.Error(w, fmt.Sprintf("method=%q: not an HTTP method token", method), http.StatusBadRequest)
			return
		}
		echoHeader := http.CanonicalHeaderKey(strings.TrimSpace(q.Get("echoHeader")))
		header := http.Header{}
		for _, h := range q["header"] {
			k, v, ok := strings.Cut(h, ":")
			if !ok || strings.TrimSpace(k) == "" {
				http.Error(w, fmt.Sprintf("header=%q: want NAME:VALUE", h), http.StatusBadRequest)
				return
			}
			header.Add(strings.TrimSpace(k), strings.TrimSpace(v))
		}
		b := Batch{Servers: map[string]int{}, Statuses: map[string]int{}, Bodies: map[string]int{}}
		if echoHeader != "" {
			b.Echoed = map[string]int{}
		}
		for i := 0; i < n && r.Context().Err() == nil; i++ {
			b.Calls++
			a, err := callOnce(r.Context(), client, method, url, header)
			if a.status != 0 {
				b.Statuses[strconv.Itoa(a.status)]++
			}
			switch {
			case err != nil:
				b.Errors++
				if len(b.FirstErrors) < 5 {
					b.FirstErrors = append(b.FirstErrors, err.Error())
				}
			case a.status/100 != 2:
				b.Bodies[a.body]++
			default:
				b.Servers[a.reply.Hostname]++
				if echoHeader != "" {
					b.Echoed[strings.Join(a.reply.Headers[echoHeader], ", ")]++
				}
			}
		}
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(b)
	}
}

// answer is what one call got: the status, and the echo server's reply
// (2xx) or the trimmed body (any other status).
type answer struct {
	status int
	reply  echoReply
	body   string
}

// echoReply is the part of the echo server's JSON reply the driver reads.
type echoReply struct {
	Hostname string              `json:"hostname"`
	Headers  map[string][]string `json:"headers"`
}

// validMethod reports whether m is an HTTP method token (RFC 9110 tchar).
func validMethod(m string) bool {
	if m == "" {
		return false
	}
	for _, c := range m {
		if c > 0x7e || c <= ' ' || strings.ContainsRune(`"(),/:;<=>?@[\]{}`, c) {
			return false
		}
	}
	return true
}

// callOnce calls url with method and header. A 2xx answer yields the echo
// server's reply; another status is no error (the caller counts it, with
// its body); no answer, or a 2xx that is not the echo server's JSON, is an
// error.
func callOnce(ctx context.Context, client *http.Client, method, url string, header http.Header) (answer, error) {
	req, err := http.NewRequestWithContext(ctx, method, url, nil)
	if err != nil {
		return answer{}, err
	}
	req.Header = header.Clone()
	resp, err := client.Do(req)
	if err != nil {
		return answer{}, err
	}
	defer resp.Body.Close()
	a := answer{status: resp.StatusCode}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return a, fmt.Errorf("reading body: %w", err)
	}
	if resp.StatusCode/100 != 2 {
		a.body = strings.TrimSpace(string(body[:min(len(body), 200)]))
		return a, nil
	}
	if err := json.Unmarshal(body, &a.reply); err != nil || a.reply.Hostname == "" {
		return a, fmt.Errorf("status %d without the echo reply: %.200s", resp.StatusCode, body)
	}
	return a, nil
}
