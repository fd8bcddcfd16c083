// Package proxyconfig is the `meshlet proxy-config` command: it reads a
// sidecar's /config_dump (admin port 15000, through the API server's
// port-forward, like istioctl proxy-config) and prints its xDS listeners,
// routes, clusters or endpoints.
package proxyconfig

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"

	// The typed configs inside the dump must be known to decode it.
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/fault/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/retry/host/previous_hosts/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	_ "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/internal/meshports"
)

// AdminPort is the sidecar's admin port (bound to the pod's loopback).
const AdminPort = meshports.Admin

type flagpole struct {
	namespace  string
	kubeconfig string
	adminAddr  string
	file       string
	output     string
	timeout    time.Duration
}

// New returns the `meshlet proxy-config` command.
func New(streams cli.Streams) *cobra.Command {
	f := &flagpole{}
	cmd := &cobra.Command{
		Use:   "proxy-config listeners|routes|clusters|endpoints POD",
		Short: "Print a sidecar's xDS configuration (like istioctl proxy-config)",
		Long: `Print the xDS resources a pod's sidecar serves, with their versions, from its
/config_dump (admin port 15000), read through the API server's port-forward.
A resource whose last update was rejected shows the NACK message.

--admin-addr reads a proxy's admin address directly and --file a saved
/config_dump, instead of a pod.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 {
				return errors.New("want a resource type: listeners, routes, clusters or endpoints")
			}
			switch args[0] {
			case "listeners", "routes", "clusters", "endpoints":
			default:
				return fmt.Errorf("resource type %q: must be listeners, routes, clusters or endpoints", args[0])
			}
			if f.adminAddr == "" && f.file == "" && len(args) != 2 {
				return errors.New("want a pod name (or --admin-addr / --file)")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			pod := ""
			if len(args) == 2 {
				pod = args[1]
			}
			return run(cmd.Context(), streams, f, args[0], pod)
		},
	}
	fl := cmd.Flags()
	fl.StringVarP(&f.namespace, "namespace", "n", "", "the pod's namespace (default: the kubeconfig's)")
	fl.StringVar(&f.kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG, ~/.kube/config, in-cluster)")
	fl.StringVar(&f.adminAddr, "admin-addr", "", "read this proxy admin address (host:port) instead of a pod's")
	fl.StringVar(&f.file, "file", "", "read a saved /config_dump instead of a pod's")
	fl.StringVarP(&f.output, "output", "o", "short", "output: short (a table) or json (the resources as Envoy prints them)")
	fl.DurationVar(&f.timeout, "timeout", 30*time.Second, "bound on reaching the pod")
	return cmd
}

func run(ctx context.Context, streams cli.Streams, f *flagpole, kind, pod string) error {
	if f.output != "short" && f.output != "json" {
		return &cli.ExitError{Code: 2, Err: fmt.Errorf("--output: invalid value %q: must be short or json", f.output)}
	}
	ctx, cancel := context.WithTimeout(ctx, f.timeout)
	defer cancel()
	var raw []byte
	var err error
	switch {
	case f.file != "":
		raw, err = os.ReadFile(f.file)
	case f.adminAddr != "":
		raw, err = fetch(ctx, f.adminAddr)
	default:
		raw, err = fetchPod(ctx, f, pod)
	}
	if err != nil {
		return err
	}
	dump, err := Parse(raw)
	if err != nil {
		return err
	}
	if f.output == "json" {
		return printJSON(streams.Out, dump, kind)
	}
	return Print(streams.Out, dump, kind)
}

func fetch(ctx context.Context, addr string) ([]byte, error) {
	u := url.URL{Scheme: "http", Host: addr, Path: "/config_dump", RawQuery: "include_eds"}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", u.String(), err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 256<<20))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", u.String(), err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("reading %s: %s: %s", u.String(), resp.Status, strings.TrimSpace(string(b)))
	}
	return b, nil
}

// fetchPod port-forwards a local port to the pod's admin port and reads it.
func fetchPod(ctx context.Context, f *flagpole, pod string) ([]byte, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	if f.kubeconfig != "" {
		rules.ExplicitPath = f.kubeconfig
	}
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{})
	rc, err := cc.ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubeconfig: %w", err)
	}
	ns := f.namespace
	if ns == "" {
		if ns, _, err = cc.Namespace(); err != nil {
			return nil, fmt.Errorf("kubeconfig namespace: %w", err)
		}
	}
	local, stop, err := forward(ctx, rc, ns, pod)
	if err != nil {
		return nil, err
	}
	defer stop()
	return fetch(ctx, local)
}

func forward(ctx context.Context, rc *rest.Config, ns, pod string) (addr string, stop func(), err error) {
	cs, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return "", nil, err
	}
	if _, err := cs.CoreV1().Pods(ns).Get(ctx, pod, metav1GetOptions()); err != nil {
		return "", nil, fmt.Errorf("pod %s/%s: %w", ns, pod, err)
	}
	rt, upgrader, err := spdy.RoundTripperFor(rc)
	if err != nil {
		return "", nil, err
	}
	u := cs.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(pod).SubResource("portforward").URL()
	dialer := spdy.NewDialer(upgrader, &http.Client{Transport: rt}, http.MethodPost, u)
	stopCh, readyCh := make(chan struct{}), make(chan struct{})
	var errOut strings.Builder
	fw, err := portforward.NewOnAddresses(dialer, []string{"127.0.0.1"}, []string{fmt.Sprintf("0:%d", AdminPort)}, stopCh, readyCh, io.Discard, &errOut)
	if err != nil {
		return "", nil, err
	}
	done := make(chan error, 1)
	go func() { done <- fw.ForwardPorts() }()
	select {
	case <-readyCh:
	case err := <-done:
		return "", nil, fmt.Errorf("port-forward to %s/%s:%d: %w %s", ns, pod, AdminPort, err, errOut.String())
	case <-ctx.Done():
		close(stopCh)
		return "", nil, fmt.Errorf("port-forward to %s/%s:%d: %w", ns, pod, AdminPort, ctx.Err())
	}
	ports, err := fw.GetPorts()
	if err != nil || len(ports) == 0 {
		close(stopCh)
		return "", nil, fmt.Errorf("port-forward to %s/%s: no local port: %v", ns, pod, err) //nolint:errorlint // err is nil when no port came back: shown, not wrapped
	}
	return fmt.Sprintf("127.0.0.1:%d", ports[0].Local), func() { close(stopCh); <-done }, nil //nolint:errcheck // waiting for the forwarder we stopped; its error is ours
}

// Dump is a proxy's /config_dump, decoded.
type Dump struct {
	Clusters  *adminv3.ClustersConfigDump
	Listeners *adminv3.ListenersConfigDump
	Routes    *adminv3.RoutesConfigDump
	Endpoints *adminv3.EndpointsConfigDump
}

// Parse decodes a /config_dump document (Envoy's shape: {"configs": [...]};
// other top-level keys, such as meshlet's bootstrap, are ignored).
func Parse(b []byte) (*Dump, error) {
	var doc struct {
		Configs []json.RawMessage `json:"configs"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("config dump: %w", err)
	}
	if doc.Configs == nil {
		return nil, errors.New("config dump: no \"configs\" (is the proxy in xDS mode?)")
	}
	d := &Dump{}
	opts := protojson.UnmarshalOptions{DiscardUnknown: true}
	for i, c := range doc.Configs {
		var typ struct {
			Type string `json:"@type"`
		}
		_ = json.Unmarshal(c, &typ)
		var m interface {
			ProtoReflect() protoreflectMessage
		}
		switch typ.Type {
		case "type.googleapis.com/envoy.admin.v3.ClustersConfigDump":
			d.Clusters = &adminv3.ClustersConfigDump{}
			m = d.Clusters
		case "type.googleapis.com/envoy.admin.v3.ListenersConfigDump":
			d.Listeners = &adminv3.ListenersConfigDump{}
			m = d.Listeners
		case "type.googleapis.com/envoy.admin.v3.RoutesConfigDump":
			d.Routes = &adminv3.RoutesConfigDump{}
			m = d.Routes
		case "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump":
			d.Endpoints = &adminv3.EndpointsConfigDump{}
			m = d.Endpoints
		default:
			continue
		}
		if err := unmarshalAny(opts, c, m); err != nil {
			return nil, fmt.Errorf("config dump: configs[%d] (%s): %w", i, typ.Type, err)
		}
	}
	return d, nil
}

// Print writes a table of kind (listeners, routes, clusters, endpoints).
func Print(w io.Writer, d *Dump, kind string) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	var nacks []string
	nack := func(what string, es *adminv3.UpdateFailureState) {
		if es != nil {
			nacks = append(nacks, fmt.Sprintf("%s (version %s, %s): %s", what, es.GetVersionInfo(), ts(es.GetLastUpdateAttempt()), es.GetDetails()))
		}
	}
	switch kind {
	case "clusters":
		fmt.Fprintln(tw, "SERVICE FQDN\tPORT\tSUBSET\tDIRECTION\tTYPE\tVERSION\tLAST UPDATED")
		var rows [][]string
		for _, state := range []struct {
			list    []*adminv3.ClustersConfigDump_DynamicCluster
			warming bool
		}{{d.Clusters.GetDynamicActiveClusters(), false}, {d.Clusters.GetDynamicWarmingClusters(), true}} {
			for _, dc := range state.list {
				c := &clusterv3.Cluster{}
				name := ""
				if dc.GetCluster() != nil && dc.GetCluster().UnmarshalTo(c) == nil {
					name = c.GetName()
				}
				nack("cluster "+name, dc.GetErrorState())
				if dc.GetCluster() == nil {
					continue
				}
				dir, port, subset, fqdn := splitName(name)
				typ := c.GetType().String()
				if state.warming {
					typ += " (warming)"
				}
				rows = append(rows, []string{fqdn, port, subset, dir, typ, dc.GetVersionInfo(), ts(dc.GetLastUpdated())})
			}
		}
		writeRows(tw, rows)
	case "listeners":
		fmt.Fprintln(tw, "NAME\tADDRESS\tPORT\tVERSION\tLAST UPDATED")
		var rows [][]string
		for _, dl := range d.Listeners.GetDynamicListeners() {
			nack("listener "+dl.GetName(), dl.GetErrorState())
			as := dl.GetActiveState()
			l := &listenerv3.Listener{}
			if as == nil || as.GetListener().UnmarshalTo(l) != nil {
				continue
			}
			sa := l.GetAddress().GetSocketAddress()
			rows = append(rows, []string{l.GetName(), sa.GetAddress(), fmt.Sprint(sa.GetPortValue()), as.GetVersionInfo(), ts(as.GetLastUpdated())})
		}
		writeRows(tw, rows)
	case "routes":
		fmt.Fprintln(tw, "NAME\tVIRTUAL HOST\tDOMAINS\tMATCH\tDESTINATIONS\tVERSION")
		var rows [][]string
		for _, dr := range d.Routes.GetDynamicRouteConfigs() {
			rc := &routev3.RouteConfiguration{}
			if dr.GetRouteConfig() != nil {
				_ = dr.GetRouteConfig().UnmarshalTo(rc)
			}
			nack("route configuration "+rc.GetName(), dr.GetErrorState())
			for _, vh := range rc.GetVirtualHosts() {
				for _, r := range vh.GetRoutes() {
					rows = append(rows, []string{rc.GetName(), vh.GetName(), domains(vh.GetDomains()), match(r.GetMatch()), dests(r), dr.GetVersionInfo()})
				}
			}
		}
		writeRows(tw, rows)
	case "endpoints":
		fmt.Fprintln(tw, "ENDPOINT\tSTATUS\tCLUSTER\tVERSION")
		var rows [][]string
		for _, de := range d.Endpoints.GetDynamicEndpointConfigs() {
			cla := &endpointv3.ClusterLoadAssignment{}
			if de.GetEndpointConfig() != nil {
				_ = de.GetEndpointConfig().UnmarshalTo(cla)
			}
			nack("endpoints "+cla.GetClusterName(), de.GetErrorState())
			for _, le := range cla.GetEndpoints() {
				for _, lb := range le.GetLbEndpoints() {
					sa := lb.GetEndpoint().GetAddress().GetSocketAddress()
					rows = append(rows, []string{fmt.Sprintf("%s:%d", sa.GetAddress(), sa.GetPortValue()), lb.GetHealthStatus().String(), cla.GetClusterName(), de.GetVersionInfo()})
				}
			}
		}
		writeRows(tw, rows)
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, n := range nacks {
		fmt.Fprintln(w, "NACK "+n)
	}
	return nil
}

func writeRows(w io.Writer, rows [][]string) {
	sort.SliceStable(rows, func(i, j int) bool { return strings.Join(rows[i], "\t") < strings.Join(rows[j], "\t") })
	for _, r := range rows {
		fmt.Fprintln(w, strings.Join(r, "\t"))
	}
}

// splitName splits Istio's cluster name DIRECTION|PORT|SUBSET|FQDN; other
// names are the FQDN column.
func splitName(name string) (dir, port, subset, fqdn string) {
	parts := strings.Split(name, "|")
	if len(parts) != 4 {
		return "-", "-", "-", name
	}
	return parts[0], parts[1], orDash(parts[2]), orDash(parts[3])
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func domains(ds []string) string {
	if len(ds) > 2 {
		return fmt.Sprintf("%s +%d more", strings.Join(ds[:2], ","), len(ds)-2)
	}
	return strings.Join(ds, ",")
}

func match(m *routev3.RouteMatch) string {
	var s string
	switch p := m.GetPathSpecifier().(type) {
	case *routev3.RouteMatch_Prefix:
		s = p.Prefix + "*"
	case *routev3.RouteMatch_Path:
		s = p.Path
	case *routev3.RouteMatch_SafeRegex:
		s = "~" + p.SafeRegex.GetRegex()
	}
	for _, h := range m.GetHeaders() {
		s += " " + h.GetName()
	}
	return s
}

func dests(r *routev3.Route) string {
	a := r.GetRoute()
	if a == nil {
		return "(not a route)"
	}
	if c := a.GetCluster(); c != "" {
		return c
	}
	var out []string
	for _, wc := range a.GetWeightedClusters().GetClusters() {
		out = append(out, fmt.Sprintf("%s %d", wc.GetName(), wc.GetWeight().GetValue()))
	}
	return strings.Join(out, ", ")
}
