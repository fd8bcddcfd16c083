// Package proxystatus holds `meshlet proxy-status` (like istioctl
// proxy-status): every proxy connected to the control plane, with the sync
// state of each xDS type and the replica serving it, read from each
// discovery replica's /debug/syncz through the API server's pod proxy (or
// from one address, e.g. a port-forward).
package proxystatus

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/webhook/discovery/server"
)

type flagpole struct {
	kubeconfig, namespace, selector, addr, output string
	port                                          int
	timeout                                       time.Duration
}

// New returns the `meshlet proxy-status` command.
func New(streams cli.Streams) *cobra.Command {
	f := &flagpole{}
	cmd := &cobra.Command{
		Use:   "proxy-status",
		Short: "Show every connected proxy's xDS sync state (SYNCED, STALE, NACK) per type",
		Long: `Ask every discovery replica (pods selected by --selector in --namespace, through the API
server's pod proxy) which proxies it serves and what each has of CDS, EDS, LDS and RDS:
SYNCED (the last version sent is acknowledged), STALE (sent, not acknowledged yet) or
NACK (rejected; the error follows the table). --addr reads one replica directly instead.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(cmd.Context(), f.timeout)
			defer cancel()
			docs, err := f.fetch(ctx)
			if err != nil {
				return err
			}
			if f.output == "json" {
				enc := json.NewEncoder(streams.Out)
				enc.SetIndent("", "  ")
				return enc.Encode(docs)
			}
			return Render(streams.Out, docs)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, then ~/.kube/config)")
	fl.StringVarP(&f.namespace, "namespace", "n", "meshlet-system", "namespace of the discovery pods")
	fl.StringVarP(&f.selector, "selector", "l", "app.kubernetes.io/name=meshlet,app.kubernetes.io/component=discovery", "label selector of the discovery pods")
	fl.IntVar(&f.port, "port", 15014, "the discovery pods' monitoring port")
	fl.StringVar(&f.addr, "addr", "", "read one replica at host:port (e.g. kubectl port-forward) instead of through the API server")
	fl.StringVarP(&f.output, "output", "o", "table", "table or json")
	fl.DurationVar(&f.timeout, "timeout", 30*time.Second, "give up after this long")
	return cmd
}

func (f *flagpole) fetch(ctx context.Context) ([]server.SyncStatus, error) {
	switch f.output {
	case "table", "json":
	default:
		return nil, fmt.Errorf("--output=%s: must be table or json", f.output)
	}
	if f.addr != "" {
		doc, err := FetchAddr(ctx, f.addr)
		if err != nil {
			return nil, err
		}
		return []server.SyncStatus{doc}, nil
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if f.kubeconfig != "" {
		rules.ExplicitPath = f.kubeconfig
	}
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("loading the Kubernetes client configuration: %w", err)
	}
	kube, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("creating the Kubernetes client: %w", err)
	}
	return FetchPods(ctx, kube, f.namespace, f.selector, f.port)
}

// FetchAddr reads /debug/syncz of one replica at addr (host:port).
func FetchAddr(ctx context.Context, addr string) (server.SyncStatus, error) {
	var doc server.SyncStatus
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+addr+"/debug/syncz", nil)
	if err != nil {
		return doc, fmt.Errorf("--addr=%s: %w", addr, err)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return doc, fmt.Errorf("reading proxy status from %s: %w", addr, err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 512))
		return doc, fmt.Errorf("reading proxy status from %s: %s: %s", addr, resp.Status, strings.TrimSpace(string(b)))
	}
	if err := json.NewDecoder(resp.Body).Decode(&doc); err != nil {
		return doc, fmt.Errorf("decoding proxy status from %s: %w", addr, err)
	}
	return doc, nil
}

// FetchPods reads /debug/syncz of every running discovery pod through the
// API server's pod proxy.
func FetchPods(ctx context.Context, kube kubernetes.Interface, namespace, selector string, port int) ([]server.SyncStatus, error) {
	pods, err := kube.CoreV1().Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: selector})
	if err != nil {
		return nil, fmt.Errorf("listing discovery pods (%s in %s): %w", selector, namespace, err)
	}
	var out []server.SyncStatus
	var errs []error
	for _, p := range pods.Items {
		if p.Status.Phase != corev1.PodRunning {
			continue
		}
		raw, err := kube.CoreV1().RESTClient().Get().Namespace(namespace).Resource("pods").
			Name(fmt.Sprintf("%s:%d", p.Name, port)).SubResource("proxy").Suffix("debug/syncz").DoRaw(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("pod %s/%s: %w", namespace, p.Name, err))
			continue
		}
		var doc server.SyncStatus
		if err := json.Unmarshal(raw, &doc); err != nil {
			errs = append(errs, fmt.Errorf("pod %s/%s: decoding /debug/syncz: %w", namespace, p.Name, err))
			continue
		}
		out = append(out, doc)
	}
	if len(out) == 0 && len(errs) == 0 {
		return nil, fmt.Errorf("no running discovery pods match %s in namespace %s", selector, namespace)
	}
	return out, errors.Join(errs...)
}

var columns = []struct{ name, typeURL string }{
	{"CDS", "type.googleapis.com/envoy.config.cluster.v3.Cluster"},
	{"LDS", "type.googleapis.com/envoy.config.listener.v3.Listener"},
	{"EDS", "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"},
	{"RDS", "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"},
}

// Render writes the table: one row per proxy, then the NACK errors.
func Render(w io.Writer, docs []server.SyncStatus) error {
	var rows []server.ProxyStatus
	for _, d := range docs {
		rows = append(rows, d.Proxies...)
	}
	sort.Slice(rows, func(i, j int) bool { return rows[i].ID < rows[j].ID })
	tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
	fmt.Fprintln(tw, "NAME\tCDS\tLDS\tEDS\tRDS\tDISCOVERY\tSTREAM")
	var nacks []string
	for _, p := range rows {
		name := p.ID
		if parts := strings.Split(p.ID, "~"); len(parts) == 4 {
			name = parts[2] // POD.NAMESPACE, as istioctl shows it
		}
		cells := []string{name}
		for _, c := range columns {
			st := p.Types[c.typeURL]
			if st == nil {
				cells = append(cells, server.StateNotSent)
				continue
			}
			cells = append(cells, st.State)
			if st.State == server.StateNACK {
				nacks = append(nacks, fmt.Sprintf("%s %s: %s", name, c.name, st.Error))
			}
		}
		stream := "sotw"
		if p.Delta {
			stream = "delta"
		}
		if p.Generator != "" {
			stream += "," + p.Generator
		}
		cells = append(cells, p.Replica, stream)
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, n := range nacks {
		if _, err := fmt.Fprintln(w, "NACK", n); err != nil {
			return err
		}
	}
	return nil
}
