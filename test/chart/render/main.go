// Command render writes manifests/ from charts/meshlet (`make manifests`):
//
//	go run ./test/chart/render -chart charts/meshlet -out manifests
package main

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"

	"github.com/meshlet/meshlet/test/chart"
)

func main() {
	dir := flag.String("chart", "charts/meshlet", "chart folder")
	out := flag.String("out", "manifests", "output folder")
	flag.Parse()
	files, err := chart.Manifests(*dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, "render:", err)
		os.Exit(1)
	}
	for name, content := range files {
		if err := os.WriteFile(filepath.Join(*out, name), []byte(content), 0o644); err != nil {
			fmt.Fprintln(os.Stderr, "render:", err)
			os.Exit(1)
		}
	}
}
