// Package app assembles the meshlet command tree. Each subcommand lives in its
// own package with a New(streams) constructor; this file only lists them.
package app

import (
	"context"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/meshlet/meshlet/cmd/meshlet/app/agent"
	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/cmd/meshlet/app/cni"
	"github.com/meshlet/meshlet/cmd/meshlet/app/discovery"
	"github.com/meshlet/meshlet/cmd/meshlet/app/grpcbootstrap"
	"github.com/meshlet/meshlet/cmd/meshlet/app/initcmd"
	"github.com/meshlet/meshlet/cmd/meshlet/app/inject"
	"github.com/meshlet/meshlet/cmd/meshlet/app/proxy"
	"github.com/meshlet/meshlet/cmd/meshlet/app/proxyconfig"
	"github.com/meshlet/meshlet/cmd/meshlet/app/proxystatus"
	"github.com/meshlet/meshlet/cmd/meshlet/app/version"
	"github.com/meshlet/meshlet/cmd/meshlet/app/webhook"
	cnipkg "github.com/meshlet/meshlet/initcni/cni"
)

// Args returns the command line for Run from a process's argv: meshlet
// executed under the CNI plugin's name (the link cni-install makes) runs
// `meshlet cni`, as container runtimes call plugins by type name with the
// request in the environment.
func Args(argv []string) []string {
	if len(argv) == 0 {
		return nil
	}
	if filepath.Base(argv[0]) == cnipkg.PluginType {
		return append([]string{"cni"}, argv[1:]...)
	}
	return argv[1:]
}

// Main runs meshlet as the process it is (os.Args, standard streams,
// SIGINT/SIGTERM cancel the command) and returns its exit code. It is the
// whole of cmd/meshlet's main, and what a test binary calls to act as
// meshlet.
func Main() int {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := Run(ctx, Args(os.Args), cli.Streams{In: os.Stdin, Out: os.Stdout, Err: os.Stderr})
	stop()
	return cli.ExitCode(err, os.Stderr)
}

// Run executes the meshlet command line args (without the program name).
func Run(ctx context.Context, args []string, streams cli.Streams) error {
	root := &cobra.Command{
		Use:           "meshlet",
		Short:         "Transparent sidecar traffic management for Kubernetes",
		Long:          "meshlet injects a transparent sidecar proxy into Kubernetes pods, speaking Istio's labels and annotations.",
		SilenceUsage:  true,
		SilenceErrors: true,
		Version:       version.String(),
	}
	root.SetIn(streams.In)
	root.SetOut(streams.Out)
	root.SetErr(streams.Err)
	root.SetArgs(args)
	root.AddCommand(
		cni.New(streams),
		cni.NewInstall(streams),
		initcmd.New(streams),
		inject.New(streams),
		inject.NewUninject(streams),
		inject.NewExplain(streams),
		version.New(streams),
		agent.New(streams),
		proxy.New(streams),
		webhook.New(streams),
		grpcbootstrap.New(streams),
		discovery.New(streams),
		proxyconfig.New(streams),
		proxystatus.New(streams),
	)
	return root.ExecuteContext(ctx)
}
