package agent_test

import (
	"os"
	"testing"

	"github.com/meshlet/meshlet/cmd/meshlet/app"
	"github.com/meshlet/meshlet/internal/proctest"
)

// envExec makes the test binary behave as the meshlet binary: the agent
// tests start it as `meshlet agent ...`, and the agent re-executes it as
// `meshlet proxy ...` — real processes, real descriptor inheritance.
const envExec = proctest.EnvExec

func TestMain(m *testing.M) {
	if os.Getenv(envExec) == "1" {
		os.Exit(app.Main())
	}
	os.Exit(m.Run())
}
