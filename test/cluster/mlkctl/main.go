// Command mlkctl brings meshlet's single-node test cluster up and down (see
// package cluster):
//
//	go run ./test/cluster/mlkctl up [-images DIR]   # idempotent; imports DIR/*.tar
//	go run ./test/cluster/mlkctl down               # stop by PID, restore the host
//	go run ./test/cluster/mlkctl status
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/meshlet/meshlet/test/cluster"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "mlkctl:", err)
		os.Exit(1)
	}
}

func run() error {
	fs := flag.NewFlagSet("mlkctl", flag.ContinueOnError)
	dir := fs.String("dir", "", "scratch folder of the cluster (default $MESHLET_CLUSTER_DIR or /var/tmp/mlk-cluster)")
	images := fs.String("images", "", "folder of image tarballs (*.tar) to import on up")
	if len(os.Args) < 2 {
		return fmt.Errorf("usage: mlkctl up|down|status [flags]")
	}
	cmd := os.Args[1]
	if err := fs.Parse(os.Args[2:]); err != nil {
		return err
	}
	cfg := cluster.Config{Dir: *dir, Log: os.Stderr}
	if *images != "" {
		m, err := filepath.Glob(filepath.Join(*images, "*.tar"))
		if err != nil {
			return err
		}
		cfg.Images = m
	}
	c, err := cluster.New(cfg)
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	switch cmd {
	case "up":
		if err := c.Up(ctx); err != nil {
			return err
		}
		fmt.Printf("export KUBECONFIG=%s\n", c.Kubeconfig)
		return nil
	case "down":
		return c.Down(ctx)
	case "status":
		if c.Running(ctx) {
			fmt.Printf("running; KUBECONFIG=%s\n", c.Kubeconfig)
			return nil
		}
		return fmt.Errorf("not running (%s)", c.Dir)
	}
	return fmt.Errorf("unknown command %q (up, down, status)", cmd)
}
