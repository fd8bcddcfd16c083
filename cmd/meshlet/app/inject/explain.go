package inject

import (
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/webhook/inject/manifest"
)

// NewExplain returns `meshlet explain`.
func NewExplain(streams cli.Streams) *cobra.Command {
	f := &flagpole{}
	var (
		webhook  bool
		nsLabels map[string]string
	)
	cmd := &cobra.Command{
		Use:   "explain -f FILE|DIR|-",
		Short: "Tell, for each workload, whether it would be injected and why",
		Long: `For every pod template in the manifests, print whether meshlet would inject
it, the reason, and any warnings. By default it answers for ` + "`meshlet inject`" + `;
with --webhook it answers for the admission webhook, given the namespace's labels.`,
		Example: `  meshlet explain -f examples/app.yaml
  meshlet explain -f k8s/ --webhook --namespace-labels istio-injection=enabled`,
		Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			opts, err := f.options()
			if err != nil {
				return err
			}
			cfg, err := loadConfig(f.config)
			if err != nil {
				return err
			}
			opts.Config = &cfg
			opts.Inject.RequireOptIn = webhook
			opts.NamespaceLabels = nsLabels
			inputs, err := readInputs(streams, f.files)
			if err != nil {
				return err
			}
			tw := tabwriter.NewWriter(streams.Out, 0, 4, 2, ' ', 0)
			fmt.Fprintln(tw, "FILE\tDOC\tOBJECT\tINJECT\tREASON\tMESSAGE")
			failed := 0
			for _, in := range inputs {
				_, res, err := manifest.Transform(in.data, opts)
				for _, r := range res {
					doc := fmt.Sprint(r.Doc)
					if r.Item > 0 {
						doc = fmt.Sprintf("%d[%d]", r.Doc, r.Item)
					}
					inject := "no"
					if r.Decision.Injected {
						inject = "yes"
					}
					reason := string(r.Decision.Reason)
					if r.Decision.Reason == "AlreadyInjected" {
						inject = "(already)"
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", in.name, doc, describe(r), inject, reason, r.Decision.Message)
					for _, w := range r.Decision.Warnings {
						fmt.Fprintf(tw, "\t\t\t\t\twarning: %s\n", w)
					}
				}
				if err != nil {
					failed++
					fmt.Fprintf(tw, "%s\t-\t-\terror\t-\t%s\n", in.name, strings.ReplaceAll(err.Error(), "\n", "; "))
				}
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if failed > 0 {
				return fmt.Errorf("%d of %d inputs had errors", failed, len(inputs))
			}
			return nil
		},
	}
	f.addInput(cmd)
	f.addConfig(cmd)
	cmd.Flags().BoolVar(&webhook, "webhook", false, "answer for the admission webhook (namespace label or pod opt-in required) instead of meshlet inject")
	cmd.Flags().StringToStringVar(&nsLabels, "namespace-labels", nil, "with --webhook: labels of the workloads' namespace, e.g. istio-injection=enabled")
	return cmd
}
