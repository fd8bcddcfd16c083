// Package inject holds `meshlet inject`, `meshlet uninject` and
// `meshlet explain`: thin file-handling adapters around the injection core
// (webhook/inject) and its manifest transformer (webhook/inject/manifest).
// They need no cluster: the injection config is the embedded default or the
// file given by --config.
package inject

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/spf13/cobra"
	"sigs.k8s.io/yaml"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	core "github.com/meshlet/meshlet/webhook/inject"
	"github.com/meshlet/meshlet/webhook/inject/manifest"
)

// flagpole holds the flags of the three commands.
type flagpole struct {
	files         []string
	output        string
	inPlace       bool
	config        string
	nativeSidecar string
	printDefaults bool
	verbose       bool
}

func (f *flagpole) addInput(cmd *cobra.Command) {
	cmd.Flags().StringArrayVarP(&f.files, "filename", "f", nil, "manifest file, directory (recursive: *.yaml, *.yml, *.json) or - for standard input; repeatable")
	cmd.Flags().BoolVarP(&f.verbose, "verbose", "v", false, "log every decision, not only warnings")
}

func (f *flagpole) addOutput(cmd *cobra.Command) {
	cmd.Flags().StringVarP(&f.output, "output", "o", "yaml", "output format: yaml or json")
	cmd.Flags().BoolVar(&f.inPlace, "in-place", false, "rewrite the files instead of printing (atomically; a file with an error is left untouched)")
}

func (f *flagpole) addConfig(cmd *cobra.Command) {
	cmd.Flags().StringVar(&f.config, "config", "", "injection config file (an InjectionConfig document, or the ConfigMap holding it under config.yaml); default: the embedded defaults")
	cmd.Flags().StringVar(&f.nativeSidecar, "native-sidecar", "", "sidecar layout when the config says auto: true (native sidecar, Kubernetes >= 1.29) or false (classic); default true")
}

// New returns `meshlet inject`.
func New(streams cli.Streams) *cobra.Command {
	f := &flagpole{}
	cmd := &cobra.Command{
		Use:   "inject -f FILE|DIR|-",
		Short: "Inject the meshlet sidecar into workload manifests, offline",
		Long: `Inject the meshlet sidecar (istio-init and istio-proxy) into every pod template
of the given manifests — Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets,
ReplicationControllers, Jobs, CronJobs and any object with a pod template at
spec.template — exactly as the meshlet webhook would. Other objects pass through
unchanged, and so do the fields and comments injection does not touch. Like
istioctl kube-inject, every pod is injected unless it opts out with the label
sidecar.istio.io/inject=false (or is never injected: hostNetwork, kube-system, ...).`,
		Example: `  meshlet inject -f examples/app.yaml
  meshlet inject -f k8s/ --in-place
  kubectl get deploy web -o yaml | meshlet inject -f - | kubectl apply -f -
  meshlet inject --config injection.yaml -f app.yaml -o json
  meshlet inject --print-defaults`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if f.printDefaults {
				_, err := streams.Out.Write(core.DefaultsYAML())
				return err
			}
			return run(streams, f, false)
		},
	}
	f.addInput(cmd)
	f.addOutput(cmd)
	f.addConfig(cmd)
	cmd.Flags().BoolVar(&f.printDefaults, "print-defaults", false, "print the embedded injection config (every field commented) and exit")
	return cmd
}

// NewUninject returns `meshlet uninject`.
func NewUninject(streams cli.Streams) *cobra.Command {
	f := &flagpole{}
	cmd := &cobra.Command{
		Use:   "uninject -f FILE|DIR|-",
		Short: "Remove the meshlet sidecar from workload manifests",
		Long: `Remove what injection added to every pod template, as recorded in its
sidecar.istio.io/status annotation: the result is the manifest before injection.`,
		Example: `  meshlet uninject -f injected.yaml
  meshlet uninject -f k8s/ --in-place`,
		Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error { return run(streams, f, true) },
	}
	f.addInput(cmd)
	f.addOutput(cmd)
	return cmd
}

func loadConfig(path string) (core.Config, error) {
	if path == "" {
		return core.DefaultConfig(), nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return core.Config{}, err
	}
	var head struct {
		Kind string            `json:"kind"`
		Data map[string]string `json:"data"`
	}
	if err := yaml.Unmarshal(data, &head); err == nil && head.Kind == "ConfigMap" {
		doc, ok := head.Data["config.yaml"]
		if !ok && len(head.Data) == 1 {
			for _, v := range head.Data {
				doc, ok = v, true
			}
		}
		if !ok {
			return core.Config{}, fmt.Errorf("%s: ConfigMap has no data key config.yaml", path)
		}
		data = []byte(doc)
	}
	c, err := core.LoadConfig(data)
	if err != nil {
		return core.Config{}, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

func (f *flagpole) options() (manifest.Options, error) {
	var o manifest.Options
	switch f.output {
	case "yaml", "":
		o.Format = manifest.FormatYAML
	case "json":
		o.Format = manifest.FormatJSON
	default:
		return o, fmt.Errorf("--output %q: must be yaml or json", f.output)
	}
	o.Inject.AutoNativeSidecar = true
	switch f.nativeSidecar {
	case "", "true":
	case "false":
		o.Inject.AutoNativeSidecar = false
	default:
		return o, fmt.Errorf("--native-sidecar %q: must be true or false", f.nativeSidecar)
	}
	return o, nil
}

// input is one file to process.
type input struct {
	name string // "-" for standard input
	data []byte
	mode fs.FileMode
}

// readInputs expands -f arguments: directories recursively, sorted.
func readInputs(streams cli.Streams, args []string) ([]input, error) {
	if len(args) == 0 {
		return nil, errors.New("no input: give -f FILE, -f DIR or -f -")
	}
	var out []input
	for _, a := range args {
		if a == "-" {
			b, err := io.ReadAll(streams.In)
			if err != nil {
				return nil, fmt.Errorf("reading standard input: %w", err)
			}
			out = append(out, input{name: "-", data: b})
			continue
		}
		st, err := os.Stat(a)
		if err != nil {
			return nil, err
		}
		if !st.IsDir() {
			b, err := os.ReadFile(a)
			if err != nil {
				return nil, err
			}
			out = append(out, input{name: a, data: b, mode: st.Mode()})
			continue
		}
		var names []string
		err = filepath.WalkDir(a, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			switch strings.ToLower(filepath.Ext(p)) {
			case ".yaml", ".yml", ".json":
				if d.Type().IsRegular() {
					names = append(names, p)
				}
			}
			return nil
		})
		if err != nil {
			return nil, err
		}
		sort.Strings(names)
		for _, n := range names {
			b, err := os.ReadFile(n)
			if err != nil {
				return nil, err
			}
			st, err := os.Stat(n)
			if err != nil {
				return nil, err
			}
			out = append(out, input{name: n, data: b, mode: st.Mode()})
		}
	}
	return out, nil
}

func describe(r manifest.Result) string {
	s := r.Kind + " " + r.Name
	if r.Namespace != "" {
		s = r.Kind + " " + r.Namespace + "/" + r.Name
	}
	return s
}

func run(streams cli.Streams, f *flagpole, uninject bool) error {
	log := cli.NewLogger(streams.Err, f.verbose)
	opts, err := f.options()
	if err != nil {
		return err
	}
	opts.Uninject = uninject
	if !uninject {
		cfg, err := loadConfig(f.config)
		if err != nil {
			return err
		}
		opts.Config = &cfg
	}
	inputs, err := readInputs(streams, f.files)
	if err != nil {
		return err
	}
	if f.inPlace {
		for _, in := range inputs {
			if in.name == "-" {
				return errors.New("--in-place cannot rewrite standard input")
			}
		}
	}
	var (
		failed, found, changed int
		out                    bytes.Buffer
		first                  = true
	)
	for _, in := range inputs {
		res, results, err := manifest.Transform(in.data, opts)
		logResults(log, in.name, results)
		found += len(results)
		for _, r := range results {
			if r.Changed && err == nil {
				changed++
			}
		}
		if err != nil {
			failed++
			fmt.Fprintf(streams.Err, "error: %s: nothing written for this input:\n  %s\n", in.name, strings.ReplaceAll(err.Error(), "\n", "\n  "))
			continue
		}
		if f.inPlace {
			if bytes.Equal(res, in.data) {
				continue
			}
			if err := writeAtomic(in.name, res, in.mode); err != nil {
				failed++
				fmt.Fprintf(streams.Err, "error: %s: not written: %v\n", in.name, err)
			}
			continue
		}
		if !first && len(res) > 0 && opts.Format == manifest.FormatYAML {
			if !bytes.HasSuffix(out.Bytes(), []byte("\n")) {
				out.WriteByte('\n')
			}
			out.WriteString("---\n")
		}
		if len(res) > 0 {
			first = false
		}
		out.Write(res)
	}
	if _, err := streams.Out.Write(out.Bytes()); err != nil {
		return err
	}
	verb := "injected"
	if uninject {
		verb = "uninjected"
	}
	log.Info("done", verb, changed, "podTemplates", found, "inputs", len(inputs), "failed", failed)
	if failed > 0 {
		return fmt.Errorf("%d of %d inputs had errors (see above)", failed, len(inputs))
	}
	return nil
}

func logResults(log *slog.Logger, file string, results []manifest.Result) {
	for _, r := range results {
		attrs := []any{"file", file, "doc", r.Doc, "object", describe(r)}
		if r.Item > 0 {
			attrs = append(attrs, "item", r.Item)
		}
		for _, w := range r.Decision.Warnings {
			log.Warn("sidecar warning", append(attrs, "warning", w)...)
		}
		log.Log(context.Background(), slog.LevelDebug, "decision", append(attrs, "changed", r.Changed, "reason", string(r.Decision.Reason), "message", r.Decision.Message)...)
	}
}

// writeAtomic replaces path by data: a temporary file in the same
// directory, synced, then renamed over the original.
func writeAtomic(path string, data []byte, mode fs.FileMode) (err error) {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".meshlet-*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if _, err = tmp.Write(data); err != nil {
		return err
	}
	if err = tmp.Chmod(mode.Perm()); err != nil {
		return err
	}
	if err = tmp.Sync(); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}
