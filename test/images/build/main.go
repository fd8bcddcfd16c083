// Command build writes meshlet's image tarballs (see package images):
//
//	go run ./test/images/build -meshlet bin/meshlet -out DIR
package main

import (
	"context"
	"flag"
	"fmt"
	"os"

	"github.com/meshlet/meshlet/test/images"
)

func main() {
	var opts images.Options
	flag.StringVar(&opts.MeshletBinary, "meshlet", "bin/meshlet", "the static meshlet binary")
	flag.StringVar(&opts.OutDir, "out", "", "folder for the image tarballs (required)")
	flag.StringVar(&opts.DebDir, "debs", "", "cache folder for Debian packages (default OUT/debs)")
	flag.StringVar(&opts.RepoRoot, "root", ".", "the meshlet source tree")
	flag.Parse()
	if opts.OutDir == "" {
		fmt.Fprintln(os.Stderr, "build: -out is required")
		os.Exit(2)
	}
	opts.Log = os.Stdout
	if _, err := images.BuildAll(context.Background(), opts); err != nil {
		fmt.Fprintln(os.Stderr, "build:", err)
		os.Exit(1)
	}
}
