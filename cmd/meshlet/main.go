// Command meshlet is the one binary of the meshlet service mesh: the admission
// webhook, the manual injector, the capture-rule installer (init container and
// CNI plugin), the sidecar agent and the proxy are all subcommands of it, so one
// image serves every container.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/meshlet/meshlet/cmd/meshlet/app"
	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := app.Run(ctx, app.Args(os.Args), cli.Streams{In: os.Stdin, Out: os.Stdout, Err: os.Stderr})
	stop()
	os.Exit(cli.ExitCode(err, os.Stderr))
}
