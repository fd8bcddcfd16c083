package server

import (
	"os"
	"testing"
)

// TestMain lets the test binary act as the proxyless gRPC client process
// (grpc-go reads its xDS bootstrap from the environment at start) or as the
// benchmarks' process of simulated sidecars.
func TestMain(m *testing.M) {
	if target := os.Getenv("MESHLET_TEST_GRPC_CLIENT"); target != "" {
		os.Exit(runGRPCClient(target))
	}
	if spec := os.Getenv(benchClientsEnv); spec != "" {
		os.Exit(runBenchClients(spec))
	}
	os.Exit(m.Run())
}
