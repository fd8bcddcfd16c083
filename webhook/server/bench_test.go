package server

import (
	"bytes"
	"crypto/tls"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"
)

// BenchmarkHandlerHTTP is the whole HTTP handler path for one pod in a
// labelled namespace: read and decode the AdmissionReview, look up the
// namespace, inject, compute the JSON patch, encode the response.
//
//	go test ./webhook/server -run '^$' -bench BenchmarkHandler -benchmem
func BenchmarkHandlerHTTP(b *testing.B) {
	for _, bc := range []struct {
		name, ns, meta string
	}{
		{"inject", "apps", ""},
		{"skip", "plain", ""},
	} {
		b.Run(bc.name, func(b *testing.B) {
			_, h := testHandler(b)
			body := reviewBody(b, podJSON(bc.ns, bc.meta), bc.ns, false)
			b.ReportAllocs()
			b.SetBytes(int64(len(body)))
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				rec := httptest.NewRecorder()
				req := httptest.NewRequest(http.MethodPost, "/inject", bytes.NewReader(body))
				req.Header.Set("Content-Type", "application/json")
				h.ServeHTTP(rec, req)
				if rec.Code != http.StatusOK {
					b.Fatalf("HTTP %d", rec.Code)
				}
			}
		})
	}
}

// BenchmarkHandlerHTTPS adds a real HTTPS connection on loopback (kept
// alive, as the API server's client does): the pod's full round trip.
func BenchmarkHandlerHTTPS(b *testing.B) {
	_, h := testHandler(b)
	srv := httptest.NewTLSServer(h)
	defer srv.Close()
	client := srv.Client()
	client.Transport.(*http.Transport).TLSClientConfig.MinVersion = tls.VersionTLS12
	body := reviewBody(b, podJSON("apps", ""), "apps", false)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		resp, err := client.Post(srv.URL+"/inject", "application/json", bytes.NewReader(body))
		if err != nil {
			b.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			b.Fatalf("HTTP %d", resp.StatusCode)
		}
	}
}
