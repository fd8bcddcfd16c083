// Package cli holds what every meshlet subcommand shares: its standard
// streams, the structured logger it writes to standard error, and the mapping
// from a returned error to the process exit code.
package cli

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
)

// Streams are a command's standard input, output and error. Commands never
// touch os.Stdin/os.Stdout/os.Stderr directly, so they run in tests without a
// terminal.
type Streams struct {
	In  io.Reader
	Out io.Writer
	Err io.Writer
}

// ExitError asks for a specific process exit code. Commands return it when the
// code carries meaning (for example the capture validation failure code);
// every other error exits with 1.
type ExitError struct {
	Code int
	Err  error
}

func (e *ExitError) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("exit status %d", e.Code)
	}
	return e.Err.Error()
}

func (e *ExitError) Unwrap() error { return e.Err }

// ExitCode prints err (if any) to w once and returns the exit code for it.
func ExitCode(err error, w io.Writer) int {
	if err == nil {
		return 0
	}
	var ee *ExitError
	if errors.As(err, &ee) {
		if ee.Err != nil {
			fmt.Fprintf(w, "meshlet: %v\n", ee.Err)
		}
		return ee.Code
	}
	fmt.Fprintf(w, "meshlet: %v\n", err)
	return 1
}

// NewLogger returns the structured logger commands write to: text to w, at
// debug level when verbose is set.
func NewLogger(w io.Writer, verbose bool) *slog.Logger {
	level := slog.LevelInfo
	if verbose {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}
