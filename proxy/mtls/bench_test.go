package mtls_test

import (
	"context"
	"net"
	"testing"
	"time"

	"github.com/meshlet/meshlet/proxy/mtls"
)

// BenchmarkHandshake: one new mutual TLS connection over loopback per op
// (dial, handshake both sides, one byte each way), with ECDSA P-256
// workload certificates of the mesh CA: a full handshake every time, and
// with the client's session cache (TLS 1.3 resumption with the server's
// ticket).
func BenchmarkHandshake(b *testing.B) {
	_, server, client := pair(b)
	in := mtls.NewInbound(server, time.Second, nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				sc, _, err := in.Accept(context.Background(), c, mtls.Strict)
				if err != nil {
					return
				}
				var one [1]byte
				if _, err := sc.Read(one[:]); err == nil {
					_, _ = sc.Write(one[:])
				}
			}()
		}
	}()
	for _, tc := range []struct {
		name   string
		resume bool
	}{{"full", false}, {"resumed", true}} {
		b.Run(tc.name, func(b *testing.B) {
			cfg := mtls.ClientConfig(client, nil, mtls.ClientTCP, "")
			if !tc.resume {
				cfg.ClientSessionCache = nil
			}
			resumed := 0
			for range b.N {
				raw, err := net.Dial("tcp", ln.Addr().String())
				if err != nil {
					b.Fatal(err)
				}
				tc, err := mtls.Dial(context.Background(), raw, cfg)
				if err != nil {
					b.Fatal(err)
				}
				var one [1]byte
				if _, err := tc.Write([]byte{1}); err != nil {
					b.Fatal(err)
				}
				if _, err := tc.Read(one[:]); err != nil {
					b.Fatal(err)
				}
				if tc.ConnectionState().DidResume {
					resumed++
				}
				tc.Close()
			}
			b.ReportMetric(float64(resumed)/float64(b.N), "resumed/op")
		})
	}
}
