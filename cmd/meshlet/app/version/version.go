// Package version reports the meshlet build: the version string stamped by
// the Makefile's ldflags and the Go toolchain that built it.
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
)

// Version is set at link time: -X github.com/meshlet/meshlet/cmd/meshlet/app/version.Version=v0.1.0.
var Version = "dev"

// String returns "meshlet VERSION (GOVERSION, vcs REVISION)".
func String() string {
	rev := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				rev = s.Value[:12]
			}
		}
	}
	return fmt.Sprintf("meshlet %s (%s, vcs %s)", Version, runtime.Version(), rev)
}

// New returns the `meshlet version` command.
func New(streams cli.Streams) *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the meshlet version",
		Args:  cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			_, err := fmt.Fprintln(streams.Out, String())
			return err
		},
	}
}
