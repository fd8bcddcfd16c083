package server

import (
	"os"
	"testing"
)

// TestMain lets the test binary act as the proxyless gRPC client process
// (grpc-go reads its xDS bootstrap from the environment at start).
func TestMain(m *testing.M) {
	if target := os.Getenv("MESHLET_TEST_GRPC_CLIENT"); target != "" {
		os.Exit(runGRPCClient(target))
	}
	os.Exit(m.Run())
}
