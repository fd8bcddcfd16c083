package manifest

import (
	"os"
	"testing"

	"github.com/meshlet/meshlet/webhook/inject"
)

// BenchmarkTransform is `meshlet inject` on examples/app.yaml without the
// file I/O: parse, inject, patch the nodes, render, restore formatting.
func BenchmarkTransform(b *testing.B) {
	data, err := os.ReadFile("../../../examples/app.yaml")
	if err != nil {
		b.Fatal(err)
	}
	cfg := inject.DefaultConfig()
	opts := Options{Config: &cfg, Inject: inject.Options{AutoNativeSidecar: true}}
	b.ReportAllocs()
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, _, err := Transform(data, opts); err != nil {
			b.Fatal(err)
		}
	}
}
