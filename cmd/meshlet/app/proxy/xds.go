package proxy

import (
	"os"
	"time"

	"github.com/spf13/pflag"

	"github.com/meshlet/meshlet/proxy/xds"
	"github.com/meshlet/meshlet/webhook/inject"
)

// Environment variables of the xDS flags (the injector sets the discovery
// address on istio-proxy; generations inherit the agent's environment).
const (
	envDiscoveryAddress = inject.EnvDiscoveryAddress
	envXDSStateFile     = "MESHLET_XDS_STATE_FILE"
	envXDSTLS           = "MESHLET_XDS_TLS"
)

// registerXDS adds the xDS flags, defaulting from the environment.
func registerXDS(fl *pflag.FlagSet, s *xds.Settings, protocol *string) {
	fl.StringVar(&s.Address, "discovery-address", os.Getenv(envDiscoveryAddress),
		"xDS discovery server host:port (env "+envDiscoveryAddress+"); empty: the static configuration only")
	state := os.Getenv(envXDSStateFile)
	if state == "" {
		state = "/var/run/meshlet/xds-state"
	}
	fl.StringVar(&s.StateFile, "xds-state-file", state,
		"where the last applied xDS configuration is kept, in the pod's runtime volume (env "+envXDSStateFile+"); empty: not kept")
	fl.StringVar(protocol, "xds-protocol", "", "xDS variant: delta or sotw; empty: delta, falling back to sotw")
	fl.StringVar((*string)(&s.TLS), "xds-tls", os.Getenv(envXDSTLS),
		"TLS to the discovery server with the workload certificate: on, off; empty: on when the port is "+xds.DefaultTLSPort+" (env "+envXDSTLS+")")
	fl.StringVar(&s.ServerName, "xds-server-name", "", "name the discovery server's certificate must carry over TLS (default: the host of --discovery-address)")
	fl.DurationVar(&s.InitialWait, "xds-initial-wait", 5*time.Second,
		"how long a generation waits for its first complete xDS configuration before it serves (not ready) anyway")
}
