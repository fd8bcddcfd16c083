package agent_test

import (
	"context"
	"os"
	"os/signal"
	"syscall"
	"testing"

	"github.com/meshlet/meshlet/cmd/meshlet/app"
	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
)

// envExec makes the test binary behave as the meshlet binary: the agent
// tests start it as `meshlet agent ...`, and the agent re-executes it as
// `meshlet proxy ...` — real processes, real descriptor inheritance.
const envExec = "MESHLET_TEST_EXEC_MESHLET"

func TestMain(m *testing.M) {
	if os.Getenv(envExec) == "1" {
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		err := app.Run(ctx, os.Args[1:], cli.Streams{In: os.Stdin, Out: os.Stdout, Err: os.Stderr})
		stop()
		os.Exit(cli.ExitCode(err, os.Stderr))
	}
	os.Exit(m.Run())
}
