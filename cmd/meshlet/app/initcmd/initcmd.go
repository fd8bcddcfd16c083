// Package initcmd is `meshlet init`: install the traffic-capture rules in a
// pod's network namespace (what the istio-init container runs), print them
// (--dry-run), remove them (--cleanup), or prove without privileges that
// capture works (--validate, the istio-validation container in CNI mode).
package initcmd

import (
	"context"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/initcni/validate"
)

// Exit codes of meshlet init (documented in README.md).
const (
	ExitFailure          = 1 // rules could not be applied/removed (iptables, netns)
	ExitInvalidOptions   = 2 // bad flags: nothing was touched
	ExitMismatch         = 3 // rules applied but the read-back differs from what was meant
	ExitValidationFailed = 4 // --validate: capture does not work
)

// AddCaptureFlags registers a flag for every option of capture.OptionSet on
// fs, bound to o (whose current values are the defaults).
func AddCaptureFlags(fs *pflag.FlagSet, o *capture.Options) {
	for _, opt := range capture.OptionSet {
		p := opt.Ptr(o)
		fs.StringVarP(p, opt.Long, opt.Short, *p, opt.Usage+" (env "+opt.Env+")")
	}
}

// ApplyEnv sets every capture option whose flag was not given from its
// environment variable, when that is set (set to "" counts: it means none).
func ApplyEnv(fs *pflag.FlagSet, o *capture.Options, lookup func(string) (string, bool)) {
	for _, opt := range capture.OptionSet {
		if fs.Changed(opt.Long) {
			continue
		}
		if v, ok := lookup(opt.Env); ok {
			*opt.Ptr(o) = v
		}
	}
}

type flagpole struct {
	opts            capture.Options
	dryRun          bool
	cleanup         bool
	validate        bool
	validateTimeout time.Duration
	netns           string
	backend         string
	verbose         bool
}

// New returns the `meshlet init` command.
func New(streams cli.Streams) *cobra.Command {
	fp := &flagpole{opts: capture.NewOptions()}
	cmd := &cobra.Command{
		Use:   "init",
		Short: "Install the traffic-capture rules in a pod's network namespace",
		Long: `Install the iptables rules that send a pod's TCP traffic through the sidecar
proxy (docs/design.md section 4), as the istio-init container does. Flags keep
istio-iptables' short names and "*"/empty semantics; each has an env-var form
(flags win). Exit codes: 0 ok, 1 failure, 2 invalid options (nothing touched),
3 rules read back differ from what was meant, 4 --validate: capture not working.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ApplyEnv(cmd.Flags(), &fp.opts, os.LookupEnv)
			return run(cmd, streams, fp)
		},
	}
	fs := cmd.Flags()
	AddCaptureFlags(fs, &fp.opts)
	fs.BoolVar(&fp.dryRun, "dry-run", false, "print the iptables-restore input instead of applying it")
	fs.BoolVar(&fp.cleanup, "cleanup", false, "remove meshlet's rules and chains instead of installing them")
	fs.BoolVar(&fp.validate, "validate", false, "prove (unprivileged, as the proxy UID/GID) that capture works; exit 4 if not")
	fs.DurationVar(&fp.validateTimeout, "validate-timeout", 10*time.Second, "how long --validate retries")
	fs.StringVar(&fp.netns, "netns", "", "network namespace file to apply in (default: the current one)")
	fs.StringVar(&fp.backend, "iptables-backend", "auto", "iptables backend: auto (probe the nat table), nft, legacy")
	fs.BoolVarP(&fp.verbose, "verbose", "v", false, "debug logging")
	return cmd
}

// Run runs `meshlet init` with args (what follows "init" on the command
// line) as the meshlet binary would, writing to streams: the plain Go entry
// point tests use to run the real command in process.
func Run(ctx context.Context, args []string, streams cli.Streams) error {
	cmd := New(streams)
	cmd.SetArgs(args)
	cmd.SetOut(streams.Out)
	cmd.SetErr(streams.Err)
	cmd.SilenceErrors, cmd.SilenceUsage = true, true
	return cmd.ExecuteContext(ctx)
}

func run(cmd *cobra.Command, streams cli.Streams, fp *flagpole) error {
	log := cli.NewLogger(streams.Err, fp.verbose)
	ctx := cmd.Context()
	backend, berr := capture.ParseBackend(fp.backend)
	n := 0
	for _, b := range []bool{fp.dryRun, fp.cleanup, fp.validate} {
		if b {
			n++
		}
	}
	var errs []error
	if berr != nil {
		errs = append(errs, berr)
	}
	if n > 1 {
		errs = append(errs, errors.New("--dry-run, --cleanup and --validate exclude each other"))
	}
	target := capture.Target{NetnsPath: fp.netns, Backend: backend, Logger: log}
	if fp.cleanup {
		if len(errs) > 0 {
			return &cli.ExitError{Code: ExitInvalidOptions, Err: errors.Join(errs...)}
		}
		return capture.Cleanup(ctx, target)
	}
	cfg, err := capture.BuildConfig(fp.opts)
	if err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return &cli.ExitError{Code: ExitInvalidOptions, Err: errors.Join(errs...)}
	}
	for _, w := range cfg.Warnings {
		log.Warn("capture option adjusted", "option", w.Name, "value", w.Value, "effect", w.Problem)
	}
	switch {
	case fp.dryRun:
		fams := []capture.Family{capture.IPv4}
		if cfg.IPv6 == capture.IPv6On {
			fams = append(fams, capture.IPv6)
		}
		var b strings.Builder
		for _, f := range fams {
			tool := "iptables"
			if f == capture.IPv6 {
				tool = "ip6tables"
			}
			fmt.Fprintf(&b, "# %s-restore --noflush\n%s", tool, capture.Rules(cfg, f).Render())
		}
		_, err := fmt.Fprint(streams.Out, b.String())
		return err
	case fp.validate:
		var res validate.Result
		err := capture.InNetns(fp.netns, func() error {
			var err error
			res, err = validate.Run(ctx, cfg, validate.Options{Timeout: fp.validateTimeout})
			return err
		})
		if errors.Is(err, validate.ErrCaptureNotWorking) {
			return &cli.ExitError{Code: ExitValidationFailed, Err: err}
		}
		if errors.Is(err, validate.ErrWrongIdentity) {
			return &cli.ExitError{Code: ExitInvalidOptions, Err: err}
		}
		if err != nil {
			return err
		}
		log.Info("capture validated", "port", res.ListenPort, "originalDst", res.OriginalDest.String(), "originalDst6", res.OriginalDest6.String(), "attempts", res.Attempts)
		return nil
	}
	if _, err := capture.Apply(ctx, cfg, target); err != nil {
		if errors.Is(err, capture.ErrMismatch) {
			return &cli.ExitError{Code: ExitMismatch, Err: err}
		}
		return err
	}
	return nil
}
