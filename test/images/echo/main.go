// Command echo is the demo HTTP server of meshlet's quickstart and e2e tests:
// every request is answered with a JSON description of itself (who served it,
// what arrived, from which address), so a client can see what the sidecars did.
// With -status it answers every request with that status instead (a failing
// backend, for retry and outlier tests).
package main

import (
	"context"
	"encoding/json"
	"flag"
	"log"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"
)

// reply is the JSON body of every response.
type reply struct {
	Hostname   string              `json:"hostname"`
	Method     string              `json:"method"`
	Path       string              `json:"path"`
	Host       string              `json:"host"`
	RemoteAddr string              `json:"remoteAddr"`
	Headers    map[string][]string `json:"headers"`
}

func main() {
	addr := flag.String("listen", ":8080", "address to serve HTTP on")
	status := flag.Int("status", http.StatusOK, "status of every response (100-599; not 200: a failing backend)")
	flag.Parse()
	if *status < 100 || *status > 599 {
		log.Fatalf("echo: -status=%d: not an HTTP status (100-599)", *status)
	}
	hostname, _ := os.Hostname()
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(*status)
		_ = json.NewEncoder(w).Encode(reply{
			Hostname: hostname, Method: r.Method, Path: r.URL.Path, Host: r.Host,
			RemoteAddr: r.RemoteAddr, Headers: r.Header,
		})
	})
	srv := &http.Server{Addr: *addr, Handler: mux, ReadHeaderTimeout: 10 * time.Second}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	go func() {
		<-ctx.Done()
		shutdown, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(shutdown)
	}()
	log.Printf("echo: serving on %s", *addr)
	if err := srv.ListenAndServe(); err != nil && err != http.ErrServerClosed {
		log.Fatalf("echo: %v", err)
	}
}
