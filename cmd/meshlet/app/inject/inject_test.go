package inject

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/cobra"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// run executes a command built by newCmd with args and stdin.
func runCmd(t *testing.T, newCmd func(cli.Streams) *cobra.Command, stdin string, args ...string) (string, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	cmd := newCmd(cli.Streams{In: strings.NewReader(stdin), Out: &out, Err: &errOut})
	cmd.SetArgs(args)
	cmd.SetOut(&errOut)
	cmd.SetErr(&errOut)
	cmd.SilenceUsage = true
	cmd.SilenceErrors = true
	err := cmd.Execute()
	return out.String(), errOut.String(), err
}

func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (rerun with -update)", err)
	}
	if string(want) != got {
		t.Fatalf("output differs from %s (rerun with -update if intended):\n--- got:\n%s", path, got)
	}
}

func TestInjectGolden(t *testing.T) {
	tests := []struct {
		name   string
		golden string
		args   []string
	}{
		{"directory recursive, order and comments kept, others byte for byte", "tree.golden.yaml", []string{"-f", "testdata/tree"}},
		{"json output", "tree.golden.json", []string{"-f", "testdata/tree/sub", "-o", "json"}},
		{"config from a ConfigMap, classic layout", "configmap.golden.yaml", []string{"-f", "testdata/tree/sub/job.yml", "--config", "testdata/configmap-config.yaml"}},
		{"native-sidecar flag", "classic-flag.golden.yaml", []string{"-f", "testdata/tree/sub/job.yml", "--native-sidecar=false"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, stderr, err := runCmd(t, New, "", tt.args...)
			if err != nil {
				t.Fatalf("%v\n%s", err, stderr)
			}
			if strings.Contains(out, "level=") {
				t.Fatal("logs leaked into the output")
			}
			golden(t, tt.golden, out)
		})
	}
}

// TestInjectIstioCompat: manifests written for Istio's injector (a gateway
// template, the pod's own istio-proxy, interception mode NONE, proxyless
// gRPC) through `meshlet inject`, then `meshlet inject` again (unchanged)
// and `meshlet uninject` (the input, byte for byte).
func TestInjectIstioCompat(t *testing.T) {
	in, err := os.ReadFile("testdata/istio-compat.yaml")
	if err != nil {
		t.Fatal(err)
	}
	out, stderr, err := runCmd(t, New, string(in), "-f", "-")
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	golden(t, "istio-compat.golden.yaml", out)
	again, _, err := runCmd(t, New, out, "-f", "-")
	if err != nil || again != out {
		t.Fatalf("re-injection changed the output (%v)", err)
	}
	back, _, err := runCmd(t, NewUninject, out, "-f", "-")
	if err != nil {
		t.Fatal(err)
	}
	if back != string(in) {
		t.Fatalf("uninject did not restore the input:\n%s", back)
	}
}

func TestInjectPreservesUntouched(t *testing.T) {
	in, err := os.ReadFile("testdata/tree/app.yaml")
	if err != nil {
		t.Fatal(err)
	}
	out, _, err := runCmd(t, New, string(in), "-f", "-")
	if err != nil {
		t.Fatal(err)
	}
	// Every original line survives, in order, with its exact text.
	outLines := strings.Split(out, "\n")
	j := 0
	for _, l := range strings.Split(string(in), "\n") {
		for j < len(outLines) && outLines[j] != l {
			j++
		}
		if j == len(outLines) {
			t.Fatalf("original line %q missing or out of order in the output", l)
		}
		j++
	}
	for _, noise := range []string{"status: {}", "creationTimestamp", "resources: {}"} {
		if strings.Contains(out, noise) {
			t.Errorf("output contains %q", noise)
		}
	}
	// The Service document is byte-identical.
	svc := string(in[strings.Index(string(in), "---\n"):])
	if !strings.HasSuffix(out, svc) {
		t.Errorf("the Service document changed")
	}
	// Uninject from stdin gives back the input exactly.
	back, _, err := runCmd(t, NewUninject, out, "-f", "-")
	if err != nil {
		t.Fatal(err)
	}
	if back != string(in) {
		t.Fatalf("uninject did not restore the input:\n%s", back)
	}
}

func copyTree(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	err := filepath.WalkDir(src, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if d.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o755)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), b, 0o640)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}

func readAll(t *testing.T, dir string) map[string]string {
	t.Helper()
	m := map[string]string{}
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			b, _ := os.ReadFile(p)
			rel, _ := filepath.Rel(dir, p)
			m[rel] = string(b)
		}
		return nil
	})
	return m
}

func TestInPlace(t *testing.T) {
	dir := copyTree(t, "testdata/tree")
	if err := os.WriteFile(filepath.Join(dir, "bad.yaml"), mustRead(t, "testdata/bad.yaml"), 0o600); err != nil {
		t.Fatal(err)
	}
	before := readAll(t, dir)
	stdout, stderr, err := runCmd(t, New, "", "-f", dir, "--in-place")
	if err == nil {
		t.Fatal("want an error for bad.yaml")
	}
	if stdout != "" {
		t.Errorf("--in-place wrote to stdout: %q", stdout)
	}
	for _, want := range []string{"bad.yaml", "document 2 (Pod bad)", `traffic.sidecar.istio.io/excludeInboundPorts="http"`} {
		if !strings.Contains(stderr, want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr)
		}
	}
	after := readAll(t, dir)
	if len(after) != len(before) {
		t.Fatalf("files appeared or vanished (temporary files left?): %v", keys(after))
	}
	if after["bad.yaml"] != before["bad.yaml"] {
		t.Error("the bad file was modified")
	}
	for _, unchanged := range []string{"sub/svc.json", "sub/README.txt"} {
		if after[unchanged] != before[unchanged] {
			t.Errorf("%s was modified", unchanged)
		}
	}
	for _, changed := range []string{"app.yaml", "sub/job.yml"} {
		if after[changed] == before[changed] || !strings.Contains(after[changed], "istio-proxy") {
			t.Errorf("%s was not injected", changed)
		}
	}
	if st, err := os.Stat(filepath.Join(dir, "app.yaml")); err != nil || st.Mode().Perm() != 0o640 {
		t.Errorf("file mode not kept: %v %v", st.Mode(), err)
	}
	// Uninject in place restores every file.
	os.Remove(filepath.Join(dir, "bad.yaml"))
	if _, stderr, err := runCmd(t, NewUninject, "", "-f", dir, "--in-place"); err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	restored := readAll(t, dir)
	delete(before, "bad.yaml")
	for k, v := range before {
		if restored[k] != v {
			t.Errorf("%s not restored:\n%s", k, restored[k])
		}
	}
}

func TestErrors(t *testing.T) {
	tests := []struct {
		name string
		args []string
		in   string
		want []string
	}{
		{"malformed document", []string{"-f", "-"}, "kind: Pod\n---\nmetadata: [\n", []string{"-: nothing written", "document 2", "malformed YAML"}},
		{"bad annotation", []string{"-f", "testdata/bad.yaml"}, "", []string{"document 2 (Pod bad)", `excludeInboundPorts="http"`}},
		{"bad output", []string{"-f", "-", "-o", "xml"}, "", []string{`--output "xml"`}},
		{"bad native flag", []string{"-f", "-", "--native-sidecar", "maybe"}, "", []string{`--native-sidecar "maybe"`}},
		{"missing file", []string{"-f", "testdata/nope.yaml"}, "", []string{"nope.yaml"}},
		{"no input", []string{}, "", []string{"no input"}},
		{"in-place stdin", []string{"-f", "-", "--in-place"}, "", []string{"standard input"}},
		{"bad config", []string{"-f", "-", "--config", "testdata/tree/app.yaml"}, "", []string{"app.yaml", `apiVersion="apps/v1"`, "unknown field"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			out, stderr, err := runCmd(t, New, tt.in, tt.args...)
			if err == nil {
				t.Fatalf("no error; stdout %q", out)
			}
			if out != "" {
				t.Errorf("stdout not empty on error: %q", out)
			}
			msg := stderr + err.Error()
			for _, w := range tt.want {
				if !strings.Contains(msg, w) {
					t.Errorf("error output lacks %q:\n%s", w, msg)
				}
			}
		})
	}
}

func TestExplain(t *testing.T) {
	out, stderr, err := runCmd(t, NewExplain, "", "-f", "testdata/tree", "-f", "../../../../webhook/inject/testdata/inject/hostnetwork.yaml")
	if err != nil {
		t.Fatalf("%v\n%s", err, stderr)
	}
	golden(t, "explain.golden.txt", out)
	out, _, err = runCmd(t, NewExplain, "", "-f", "testdata/tree/app.yaml", "--webhook")
	if err != nil || !strings.Contains(out, "NamespaceNotEnabled") {
		t.Fatalf("webhook mode without namespace label: %v\n%s", err, out)
	}
	out, _, err = runCmd(t, NewExplain, "", "-f", "testdata/tree/app.yaml", "--webhook", "--namespace-labels", "istio-injection=enabled")
	if err != nil || !strings.Contains(out, "Injected") {
		t.Fatalf("webhook mode with namespace label: %v\n%s", err, out)
	}
	if _, _, err := runCmd(t, NewExplain, "", "-f", "testdata/bad.yaml"); err == nil {
		t.Fatal("explain of a bad file must fail")
	}
}

func TestPrintDefaults(t *testing.T) {
	out, _, err := runCmd(t, New, "", "--print-defaults")
	if err != nil || !strings.Contains(out, "kind: InjectionConfig") {
		t.Fatalf("%v %q", err, out)
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func keys(m map[string]string) []string {
	var k []string
	for s := range m {
		k = append(k, s)
	}
	return k
}
