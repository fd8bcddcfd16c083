// Package cni holds `meshlet cni` (the chained CNI plugin, executed by the
// container runtime with CNI_* environment and the config on stdin) and
// `meshlet cni-install` (the node DaemonSet's installer of that plugin).
package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/initcni/cni"
)

// New returns `meshlet cni`, the CNI plugin entry point. It speaks the CNI
// protocol (ADD, DEL, CHECK, STATUS, GC, VERSION) on stdin/stdout; errors
// are printed as CNI error JSON and exit 1.
func New(streams cli.Streams) *cobra.Command {
	return &cobra.Command{
		Use:                "cni",
		Short:              "Run as the chained CNI plugin (invoked by the container runtime)",
		DisableFlagParsing: true,
		RunE: func(*cobra.Command, []string) error {
			p := &cni.Plugin{Stdout: streams.Out}
			if e := skelMain(p); e != nil {
				// skel leaves printing to the caller: CNI error JSON on stdout.
				if err := json.NewEncoder(streams.Out).Encode(e); err != nil {
					return err
				}
				return &cli.ExitError{Code: 1}
			}
			return nil
		},
	}
}

type installFlagpole struct {
	opts            cni.InstallOptions
	kubeconfigFrom  string
	saDir           string
	server          string
	captureDefaults string
	logLevel        string
	logFile         string
	backend         string
	once            bool
	verbose         bool
}

// NewInstall returns `meshlet cni-install`.
func NewInstall(streams cli.Streams) *cobra.Command {
	fp := &installFlagpole{}
	cmd := &cobra.Command{
		Use:   "cni-install",
		Short: "Install the meshlet CNI plugin on this node and keep it installed",
		Long: `Install the meshlet binary into the CNI bin dir with meshlet-cni linked to it
(meshlet called by that name is the plugin), write a kubeconfig for the plugin, and merge the plugin into the
node's primary CNI config (converting a single .conf into a .conflist),
atomically. Unless --once, keep running: repair the entry whenever the primary
CNI plugin rewrites its config, refresh the kubeconfig, and remove everything
again on SIGTERM.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return runInstall(cmd, streams, fp)
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&fp.opts.ConfDir, "cni-conf-dir", "/etc/cni/net.d", "CNI config directory (host mount)")
	fs.StringVar(&fp.opts.BinDir, "cni-bin-dir", "/opt/cni/bin", "CNI binary directory (host mount)")
	fs.StringVar(&fp.opts.ConfName, "cni-conf-name", "", "primary config file to chain onto (default: the first one kubelet picks)")
	fs.StringVar(&fp.kubeconfigFrom, "kubeconfig", "", "copy this kubeconfig for the plugin instead of building one from the service account")
	fs.StringVar(&fp.saDir, "service-account-dir", "/var/run/secrets/kubernetes.io/serviceaccount", "service account token and CA for the plugin's kubeconfig")
	fs.StringVar(&fp.server, "apiserver", "", "API server URL for the plugin's kubeconfig (default https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT)")
	fs.StringVar(&fp.captureDefaults, "capture-defaults", "", `capture defaults as JSON, keys like the pod annotations, e.g. {"excludeInboundPorts":"`+capture.DefaultInboundPortsExclude+`"}`)
	fs.StringVar(&fp.logLevel, "plugin-log-level", "info", "plugin log level: info or debug")
	fs.StringVar(&fp.logFile, "plugin-log-file", "", "plugin log file on the node (default: the runtime's stderr capture)")
	fs.StringVar(&fp.backend, "iptables-backend", "auto", "plugin iptables backend: auto, nft, legacy")
	fs.DurationVar(&fp.opts.Resync, "resync", time.Minute, "how often to re-check the config and refresh the kubeconfig")
	fs.BoolVar(&fp.once, "once", false, "install once and exit, leaving everything in place")
	fs.BoolVarP(&fp.verbose, "verbose", "v", false, "debug logging")
	return cmd
}

func runInstall(cmd *cobra.Command, streams cli.Streams, fp *installFlagpole) error {
	log := cli.NewLogger(streams.Err, fp.verbose)
	o := fp.opts
	o.Logger = log
	o.Entry.LogLevel, o.Entry.LogFile, o.Entry.IPTablesBackend = fp.logLevel, fp.logFile, fp.backend
	if fp.captureDefaults != "" {
		if err := json.Unmarshal([]byte(fp.captureDefaults), &o.Entry.Capture); err != nil {
			return &cli.ExitError{Code: 2, Err: fmt.Errorf("--capture-defaults: %w", err)}
		}
	}
	kubeconfig := func() ([]byte, error) {
		if fp.kubeconfigFrom != "" {
			return os.ReadFile(fp.kubeconfigFrom)
		}
		server := fp.server
		if server == "" {
			host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
			if host == "" || port == "" {
				return nil, errors.New("no --kubeconfig, --apiserver or KUBERNETES_SERVICE_HOST/PORT")
			}
			server = "https://" + net.JoinHostPort(host, port)
		}
		return cni.InClusterKubeconfig(fp.saDir, server)
	}
	kc, err := kubeconfig()
	if err != nil {
		return err
	}
	o.Kubeconfig = kc
	if fp.once {
		return cni.Install(o)
	}
	return cni.Run(cmd.Context(), o, kubeconfig)
}
