package ca

import (
	"testing"
	"time"
)

// BenchmarkSign is the CA's signing cost alone: parse and check a CSR, sign
// a workload certificate (ECDSA P-256 root), per request.
func BenchmarkSign(b *testing.B) {
	now := time.Now()
	data, err := NewSelfSigned(now, time.Hour, DefaultTrustDomain)
	if err != nil {
		b.Fatal(err)
	}
	a, err := ParseSecret("bench", data, now)
	if err != nil {
		b.Fatal(err)
	}
	id := Identity{TrustDomain: DefaultTrustDomain, Namespace: "team-a", ServiceAccount: "reviews"}
	csrPEM, _ := newCSR(b, id.String())
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			csr, err := ParseCSR(csrPEM, id)
			if err != nil {
				b.Error(err)
				return
			}
			if _, err := a.Sign(csr, id, now, 24*time.Hour); err != nil {
				b.Error(err)
				return
			}
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "CSRs/s")
}

// BenchmarkCreateCertificate is one replica's issuance throughput end to end:
// CreateCertificate over gRPC+TLS from parallel clients, each request's
// token checked by a TokenReview against a real API server (envtest) and the
// certificate signed. The clients' CSRs are made before the timer starts.
func BenchmarkCreateCertificate(b *testing.B) {
	envtestSkip(b)
	cp := newNamespace(b, "istio-system")
	app := newNamespace(b, "team-a")
	ca := startCA(b, cp, nil)
	token := serviceAccountToken(b, app, "reviews", DefaultAudience)
	csrs := make([][]byte, 64)
	for i := range csrs {
		csrs[i], _ = newCSR(b)
	}
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			if _, err := ca.request(token, csrs[i%len(csrs)], 0); err != nil {
				b.Error(err)
				return
			}
			i++
		}
	})
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "CSRs/s")
}
