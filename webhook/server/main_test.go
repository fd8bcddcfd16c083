package server

import (
	"os"
	"testing"

	"github.com/go-logr/logr"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
)

func TestMain(m *testing.M) {
	// controller-runtime prints a stack trace if its logger is never set.
	ctrllog.SetLogger(logr.Discard())
	os.Exit(m.Run())
}
