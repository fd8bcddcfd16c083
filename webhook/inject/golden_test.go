package inject_test

import (
	"bytes"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/meshlet/meshlet/webhook/inject"
	"github.com/meshlet/meshlet/webhook/inject/manifest"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// TestGolden runs every testdata/inject/NAME.{yaml,json} through the
// injection core (via manifest.Transform, as `meshlet inject` does) with the
// embedded defaults, or NAME.config.yaml when present, and compares with
// NAME.golden.yaml: the output followed by the decisions as comments (or the
// error). Each output is then injected again (must be byte-identical:
// idempotent) and uninjected (must give back the input exactly). Every pod
// template also goes through the webhook path (the admission handler over
// HTTP, its JSON patch applied): the same pod as the CLI's, re-admission
// changes nothing, Uninject gives back the input pod.
func TestGolden(t *testing.T) {
	inputs, err := filepath.Glob("testdata/inject/*")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, in := range inputs {
		base := filepath.Base(in)
		if strings.HasSuffix(base, ".golden.yaml") || strings.HasSuffix(base, ".config.yaml") {
			continue
		}
		name := strings.TrimSuffix(strings.TrimSuffix(base, ".yaml"), ".json")
		n++
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			data, err := os.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			cfg := inject.DefaultConfig()
			if c, err := os.ReadFile(filepath.Join("testdata/inject", name+".config.yaml")); err == nil {
				if cfg, err = inject.LoadConfig(c); err != nil {
					t.Fatalf("config: %v", err)
				}
			}
			opts := manifest.Options{Config: &cfg, Inject: inject.Options{AutoNativeSidecar: true}}
			out, results, terr := manifest.Transform(data, opts)
			var got bytes.Buffer
			if terr != nil {
				got.WriteString("# error:\n")
				for _, l := range strings.Split(terr.Error(), "\n") {
					got.WriteString("#   " + l + "\n")
				}
			} else {
				got.Write(out)
				got.WriteString("# decisions:\n")
			}
			for _, r := range results {
				fmt.Fprintf(&got, "#   doc %d", r.Doc)
				if r.Item > 0 {
					fmt.Fprintf(&got, " item %d", r.Item)
				}
				fmt.Fprintf(&got, " %s %s: %s: %s\n", r.Kind, r.Name, r.Decision.Reason, r.Decision.Message)
				for _, w := range r.Decision.Warnings {
					fmt.Fprintf(&got, "#     warning: %s\n", w)
				}
			}
			golden := filepath.Join("testdata/inject", name+".golden.yaml")
			if *update {
				if err := os.WriteFile(golden, got.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run go test ./webhook/inject/ -run TestGolden -update)", err)
			}
			if !bytes.Equal(got.Bytes(), want) {
				t.Fatalf("output differs from %s (rerun with -update if intended):\n%s", golden, lineDiff(string(want), got.String()))
			}
			if terr != nil {
				return
			}

			checkWebhookPath(t, &cfg, opts.Inject, data, out)

			again, results2, err := manifest.Transform(out, opts)
			if err != nil {
				t.Fatalf("re-inject: %v", err)
			}
			if !bytes.Equal(again, out) {
				t.Fatalf("re-injection is not idempotent:\n%s", lineDiff(string(out), string(again)))
			}
			for i, r := range results2 {
				if results[i].Decision.Injected && r.Decision.Reason != inject.ReasonAlreadyInjected {
					t.Errorf("re-inject of doc %d: reason %s, want AlreadyInjected", r.Doc, r.Decision.Reason)
				}
			}

			un := manifest.Options{Uninject: true}
			if strings.HasSuffix(base, ".json") {
				// JSON in, YAML out: compare as (key-ordered) JSON.
				un.Format = manifest.FormatJSON
			}
			back, _, err := manifest.Transform(out, un)
			if err != nil {
				t.Fatalf("uninject: %v", err)
			}
			orig, _, err := manifest.Transform(data, un)
			if err != nil {
				t.Fatalf("uninject input: %v", err)
			}
			if !bytes.Equal(back, orig) {
				t.Fatalf("uninject does not restore the input:\n%s", lineDiff(string(orig), string(back)))
			}
		})
	}
	if n < 25 {
		t.Errorf("only %d golden cases, want at least 25", n)
	}
}

// lineDiff shows the first differing lines.
func lineDiff(want, got string) string {
	w, g := strings.Split(want, "\n"), strings.Split(got, "\n")
	for i := 0; i < len(w) || i < len(g); i++ {
		var a, b string
		if i < len(w) {
			a = w[i]
		}
		if i < len(g) {
			b = g[i]
		}
		if a != b {
			return fmt.Sprintf("line %d:\nwant: %q\n got: %q", i+1, a, b)
		}
	}
	return "(identical lines; differ in trailing newline)"
}
