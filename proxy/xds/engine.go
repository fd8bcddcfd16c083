package xds

import (
	"github.com/meshlet/meshlet/proxy/config"
)

// The engine's configuration types that xDS resources translate into. One
// place names them, so the translation reads in the engine's vocabulary.
type (
	engineConfig = config.L7
	service      = config.Service
	route        = config.Route
	match        = config.Match
	stringMatch  = config.StringMatch
	destination  = config.Destination
	rewrite      = config.Rewrite
	retryPolicy  = config.RetryPolicy
	fault        = config.Fault
	faultDelay   = config.FaultDelay
	faultAbort   = config.FaultAbort
	mirror       = config.Mirror
	headerPolicy = config.HeaderPolicy
	headerOps    = config.HeaderOps
	cluster      = config.Cluster
	endpoint     = config.Endpoint
	dnsDiscovery = config.DNSDiscovery
	outlier      = config.OutlierDetection
	upstreamTLS  = config.UpstreamTLS
	portConfig   = config.PortConfig
)

var dur = config.D

// Applier is the engine side of the client: Apply validates a whole
// configuration, compiles it and swaps it in atomically, or returns an
// error naming the field and keeps serving the previous one.
type Applier interface {
	Apply(cfg config.L7) error
}

// ApplierFunc adapts a function to Applier.
type ApplierFunc func(cfg config.L7) error

// Apply calls f.
func (f ApplierFunc) Apply(cfg config.L7) error { return f(cfg) }
