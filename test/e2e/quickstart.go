// Package e2e is meshlet's real-cluster tier: the README quickstart and the
// assertions around it, against the single-node cluster of package cluster.
// The tests run only with MESHLET_E2E=1 (`make test-e2e`, part of `make
// test`); `make demo` runs the same quickstart and prints what a user sees.
package e2e

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/meshlet/meshlet/test/cluster"
	"github.com/meshlet/meshlet/test/images"
)

// Step is one quickstart command, as the README shows it.
type Step struct {
	// Tool is "helm" or "kubectl".
	Tool string
	Args []string
}

func (s Step) String() string { return s.Tool + " " + strings.Join(s.Args, " ") }

// QuickstartNamespace is the namespace the quickstart labels.
const QuickstartNamespace = "demo"

// Quickstart is the README quickstart, step by step (paths relative to the
// repository root).
var Quickstart = []Step{
	{"helm", []string{"install", "meshlet", "charts/meshlet", "--namespace", "meshlet-system", "--create-namespace", "--wait", "--timeout", "5m"}},
	{"kubectl", []string{"create", "namespace", "demo"}},
	{"kubectl", []string{"label", "namespace", "demo", "istio-injection=enabled"}},
	{"kubectl", []string{"apply", "--namespace", "demo", "-f", "test/e2e/testdata/app.yaml"}},
	{"kubectl", []string{"wait", "--namespace", "demo", "--for=condition=Available", "deployment/echo", "deployment/client", "--timeout=180s"}},
	{"kubectl", []string{"get", "pods", "--namespace", "demo", "-o", "custom-columns=NAME:.metadata.name,STATUS:.status.phase,INIT:.spec.initContainers[*].name,CONTAINERS:.spec.containers[*].name"}},
	{"kubectl", []string{"logs", "--namespace", "demo", "deployment/client", "-c", "client", "--tail=3"}},
}

// Run runs one step against c from the repository root, echoing the command
// and its output to out.
func Run(ctx context.Context, c *cluster.Cluster, s Step, out io.Writer) ([]byte, error) {
	fmt.Fprintf(out, "$ %s\n", s)
	var b []byte
	var err error
	switch s.Tool {
	case "helm":
		b, err = c.Helm(ctx, s.Args...)
	case "kubectl":
		b, err = c.Kubectl(ctx, nil, s.Args...)
	default:
		return nil, fmt.Errorf("unknown tool %q", s.Tool)
	}
	out.Write(b)
	return b, err
}

// Images returns the image tarballs to import: those in $MESHLET_IMAGES
// (`make images` output), else freshly built into dir from the source tree
// at root.
func Images(ctx context.Context, root, dir string, log io.Writer) ([]string, error) {
	if d := os.Getenv("MESHLET_IMAGES"); d != "" {
		m, err := filepath.Glob(filepath.Join(d, "*.tar"))
		if err != nil || len(m) == 0 {
			return nil, fmt.Errorf("no image tarballs in MESHLET_IMAGES=%s (run make images)", d)
		}
		return m, nil
	}
	bin := filepath.Join(dir, "meshlet")
	if err := images.GoBuild(ctx, root, "./cmd/meshlet", bin); err != nil {
		return nil, err
	}
	home, _ := os.UserHomeDir()
	res, err := images.BuildAll(ctx, images.Options{RepoRoot: root, MeshletBinary: bin, OutDir: dir,
		DebDir: filepath.Join(home, ".cache", "meshlet", "debs"), Log: log})
	if err != nil {
		return nil, err
	}
	var out []string
	for _, r := range res {
		out = append(out, r.Tarball)
	}
	return out, nil
}
