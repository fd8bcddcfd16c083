package certs

import (
	"bytes"
	"crypto/x509"
	"testing"
	"time"

	"github.com/meshlet/meshlet/internal/certpem"
)

var testPolicy = Policy{DNSNames: []string{"meshlet-webhook.meshlet-system.svc"}, CAValidity: 30 * time.Hour, CertValidity: 3 * time.Hour}

func always(*x509.Certificate) bool { return true }
func never(*x509.Certificate) bool  { return false }

func mustPlan(t *testing.T, data map[string][]byte, now time.Time, pub func(*x509.Certificate) bool) (map[string][]byte, bool, string) {
	t.Helper()
	out, changed, reason, err := Plan(data, now, testPolicy, pub)
	if err != nil {
		t.Fatal(err)
	}
	return out, changed, reason
}

func TestPlanCreatesThenIsStable(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 11, 22, 0, 0, 0, 0, time.UTC)
	data, changed, _ := mustPlan(t, nil, now, never)
	if !changed {
		t.Fatal("empty secret: want new certificates")
	}
	if err := Verify(data[KeyCert], data[KeyCABundle], testPolicy.DNSNames[0], now); err != nil {
		t.Fatal(err)
	}
	again, changed, reason := mustPlan(t, data, now.Add(time.Hour), always)
	if changed {
		t.Fatalf("fresh certificates changed after 1h: %s", reason)
	}
	if !bytes.Equal(again[KeyCert], data[KeyCert]) {
		t.Fatal("unchanged plan returned different data")
	}
}

func TestPlanRenewsServingWithSameCA(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 11, 22, 0, 0, 0, 0, time.UTC)
	data, _, _ := mustPlan(t, nil, now, never)
	later := now.Add(2*time.Hour + 10*time.Minute) // past 2/3 of 3h
	next, changed, reason := mustPlan(t, data, later, never)
	if !changed || bytes.Equal(next[KeyCert], data[KeyCert]) {
		t.Fatalf("want a renewed serving certificate, got changed=%v %q", changed, reason)
	}
	if !bytes.Equal(next[KeyCABundle], data[KeyCABundle]) {
		t.Fatal("serving renewal must not touch the CA bundle")
	}
	if err := Verify(next[KeyCert], data[KeyCABundle], testPolicy.DNSNames[0], later); err != nil {
		t.Fatalf("renewed certificate must verify against the published bundle: %v", err)
	}
}

func TestPlanRotatesCAInTwoPhases(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 11, 22, 0, 0, 0, 0, time.UTC)
	data, _, _ := mustPlan(t, nil, now, never)
	later := now.Add(21 * time.Hour) // past 2/3 of the CA's 30h
	// Keep the serving certificate fresh so only the CA is due.
	ca, err := parseAuthority(data[KeyCABundle], data[KeyCAKey])
	if err != nil {
		t.Fatal(err)
	}
	data[KeyCert], data[KeyKey], err = ca.Issue(later, testPolicy.CertValidity, testPolicy.DNSNames, nil)
	if err != nil {
		t.Fatal(err)
	}
	phase1, changed, reason := mustPlan(t, data, later, never)
	if !changed {
		t.Fatal("CA due: want a change")
	}
	bundle, _ := certpem.ParseCertificates(phase1[KeyCABundle])
	if len(bundle) != 2 {
		t.Fatalf("phase 1 bundle has %d CAs, want new+old (%s)", len(bundle), reason)
	}
	if !bytes.Equal(phase1[KeyCert], data[KeyCert]) {
		t.Fatal("phase 1 must keep the serving certificate until the new CA is published")
	}
	// Still unpublished: nothing more happens.
	if _, changed, reason := mustPlan(t, phase1, later, never); changed {
		t.Fatalf("unpublished new CA: want no change, got %q", reason)
	}
	phase2, changed, _ := mustPlan(t, phase1, later, always)
	if !changed || bytes.Equal(phase2[KeyCert], data[KeyCert]) {
		t.Fatal("published new CA: want the serving certificate moved to it")
	}
	// The new serving certificate verifies against the phase-1 bundle, which
	// the API server already holds.
	if err := Verify(phase2[KeyCert], phase1[KeyCABundle], testPolicy.DNSNames[0], later); err != nil {
		t.Fatal(err)
	}
	// Once the old CA expires it leaves the bundle.
	phase3, changed, _ := mustPlan(t, phase2, now.Add(31*time.Hour), always)
	if b, _ := certpem.ParseCertificates(phase3[KeyCABundle]); !changed || len(b) != 1 {
		t.Fatalf("expired old CA: want it dropped, bundle has %d", len(b))
	}
}

func TestPlanRecovers(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 11, 22, 0, 0, 0, 0, time.UTC)
	good, _, _ := mustPlan(t, nil, now, never)
	tests := map[string]map[string][]byte{
		"garbage CA":       {KeyCABundle: []byte("junk"), KeyCAKey: good[KeyCAKey], KeyCert: good[KeyCert], KeyKey: good[KeyKey]},
		"mismatched key":   {KeyCABundle: good[KeyCABundle], KeyCAKey: good[KeyKey], KeyCert: good[KeyCert], KeyKey: good[KeyKey]},
		"missing cert":     {KeyCABundle: good[KeyCABundle], KeyCAKey: good[KeyCAKey]},
		"cert key swapped": {KeyCABundle: good[KeyCABundle], KeyCAKey: good[KeyCAKey], KeyCert: good[KeyCert], KeyKey: good[KeyCAKey]},
	}
	for name, data := range tests {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			out, changed, _ := mustPlan(t, data, now, never)
			if !changed {
				t.Fatal("want a repair")
			}
			if err := Verify(out[KeyCert], out[KeyCABundle], testPolicy.DNSNames[0], now); err != nil {
				t.Fatal(err)
			}
		})
	}
	t.Run("other names", func(t *testing.T) {
		p := testPolicy
		p.DNSNames = []string{"other.ns.svc"}
		out, changed, _, err := Plan(good, now, p, never)
		if err != nil || !changed {
			t.Fatalf("renamed service: want reissue, got changed=%v err=%v", changed, err)
		}
		if err := Verify(out[KeyCert], out[KeyCABundle], "other.ns.svc", now); err != nil {
			t.Fatal(err)
		}
	})
}
