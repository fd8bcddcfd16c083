package manifest

import (
	"bytes"
	"testing"

	"github.com/meshlet/meshlet/webhook/inject"
)

// FuzzTransform feeds arbitrary bytes (YAML, JSON, garbage) to Transform:
// never a panic; on success, re-injection is byte-identical and uninjection
// gives back the uninjected input (as data, in order).
func FuzzTransform(f *testing.F) {
	f.Add([]byte("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n  containers:\n  - name: a\n    image: a\n"))
	f.Add([]byte("kind: Deployment\nspec:\n  template:\n    spec:\n      containers: [{name: x}]\n---\nkind: Service\n"))
	f.Add([]byte(`{"kind":"List","items":[{"kind":"Pod","spec":{"containers":[{"name":"c"}]}}]}`))
	f.Add([]byte("kind: CronJob\nspec: {jobTemplate: {spec: {template: {spec: {containers: []}}}}}\n"))
	f.Add([]byte("a: [\n---\n- x\n--- !tag\n&a {b: *a}\n"))
	f.Add([]byte("kind: Pod\nmetadata:\n  annotations: {}\nspec: {containers: [{name: a}], volumes: []}\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		cfg := inject.DefaultConfig()
		opts := Options{Config: &cfg, Inject: inject.Options{AutoNativeSidecar: true}}
		out, _, err := Transform(data, opts)
		if err != nil {
			return
		}
		again, _, err := Transform(out, opts)
		if err != nil {
			t.Fatalf("re-inject of our own output failed: %v\n%s", err, out)
		}
		if !bytes.Equal(again, out) {
			t.Fatalf("re-inject changed the output:\n%s\n---- vs\n%s", out, again)
		}
		// Compared as key-ordered JSON: formatting the encoder cannot
		// reproduce (1-space indentation, JSON in and YAML out) is allowed to
		// differ here; the golden tests hold realistic files to the byte.
		un := Options{Uninject: true, Format: FormatJSON}
		orig, _, err := Transform(data, un)
		if err != nil {
			return // no JSON form (e.g. a recursive alias)
		}
		back, _, err := Transform(out, un)
		if err != nil {
			t.Fatalf("uninject of our own output failed: %v", err)
		}
		if !bytes.Equal(back, orig) {
			t.Fatalf("uninject did not restore the input:\n%s\n---- vs\n%s", orig, back)
		}
	})
}
