// Package grpcbootstrap is the `meshlet grpc-bootstrap` command: the init
// container grpc-bootstrap-init of the proxyless gRPC injection templates
// (grpc-agent, grpc-simple). It writes the xDS bootstrap file the app's gRPC
// library reads from GRPC_XDS_BOOTSTRAP, pointing at the discovery service.
package grpcbootstrap

import (
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/meshlet/meshlet/cmd/meshlet/app/cli"
	"github.com/meshlet/meshlet/webhook/inject"
)

type flagpole struct {
	discoveryAddress string
	out              string
	node             inject.GRPCNode
}

// New returns the `meshlet grpc-bootstrap` command.
func New(streams cli.Streams) *cobra.Command {
	f := &flagpole{}
	cmd := &cobra.Command{
		Use:   "grpc-bootstrap",
		Short: "Write the proxyless gRPC xDS bootstrap file (init container of the grpc-agent and grpc-simple templates)",
		Long: `Write the xDS bootstrap file a proxyless gRPC application reads from
GRPC_XDS_BOOTSTRAP: the discovery service (--discovery-address, plaintext xDS)
and the node (Istio's id sidecar~IP~POD.NS~NS.svc.DOMAIN, metadata
GENERATOR=grpc). The pod's name, namespace and IP default to POD_NAME,
POD_NAMESPACE and INSTANCE_IP, which the injected container gets from the
downward API. The file is written atomically.`,
		Args: cobra.NoArgs,
		RunE: func(*cobra.Command, []string) error {
			return run(streams, f)
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&f.discoveryAddress, "discovery-address", "", "discovery service xDS address, host:port (required)")
	fl.StringVar(&f.out, "out", inject.GRPCBootstrapFile, `file to write ("-": standard output)`)
	fl.StringVar(&f.node.PodName, "pod-name", os.Getenv("POD_NAME"), "pod name (default $POD_NAME)")
	fl.StringVar(&f.node.Namespace, "pod-namespace", os.Getenv("POD_NAMESPACE"), "pod namespace (default $POD_NAMESPACE)")
	fl.StringVar(&f.node.IP, "pod-ip", os.Getenv("INSTANCE_IP"), "pod IP (default $INSTANCE_IP)")
	fl.StringVar(&f.node.ClusterDomain, "cluster-domain", "cluster.local", "cluster DNS domain")
	return cmd
}

func run(streams cli.Streams, f *flagpole) error {
	b, err := inject.GRPCBootstrap(f.discoveryAddress, f.node)
	if err != nil {
		return fmt.Errorf("grpc-bootstrap: %w", err)
	}
	if f.out == "-" {
		_, err := streams.Out.Write(b)
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(f.out), ".bootstrap-*")
	if err != nil {
		return fmt.Errorf("writing %s: %w", f.out, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", f.out, err)
	}
	if err := tmp.Chmod(0o644); err != nil {
		tmp.Close()
		return fmt.Errorf("writing %s: %w", f.out, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("writing %s: %w", f.out, err)
	}
	if err := os.Rename(tmp.Name(), f.out); err != nil {
		return fmt.Errorf("writing %s: %w", f.out, err)
	}
	return nil
}
