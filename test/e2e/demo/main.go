// Command demo is `make demo`: it brings meshlet's test cluster up (building
// what is missing), runs the README quickstart and prints what a user sees.
// The cluster stays up; `make cluster-down` removes it.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/meshlet/meshlet/test/cluster"
	"github.com/meshlet/meshlet/test/e2e"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run() error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	root, err := filepath.Abs(".")
	if err != nil {
		return err
	}
	tmp, err := os.MkdirTemp("", "meshlet-demo-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	imgs, err := e2e.Images(ctx, root, tmp, os.Stderr)
	if err != nil {
		return err
	}
	c, err := cluster.New(cluster.Config{RepoRoot: root, Images: imgs, Log: os.Stderr})
	if err != nil {
		return err
	}
	if err := c.Up(ctx); err != nil {
		return err
	}
	fmt.Printf("# the test cluster is up: export KUBECONFIG=%s\n", c.Kubeconfig)
	// A rerun starts from a clean slate.
	_, _ = c.Helm(ctx, "uninstall", "meshlet", "--namespace", "meshlet-system", "--wait")
	if err := c.DeleteNamespace(ctx, e2e.QuickstartNamespace); err != nil {
		return err
	}
	for _, s := range e2e.Quickstart {
		if _, err := e2e.Run(ctx, c, s, os.Stdout); err != nil {
			return err
		}
		fmt.Println()
	}
	fmt.Println("# done; the cluster keeps running (make cluster-down stops it)")
	return nil
}
