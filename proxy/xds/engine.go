package xds

import (
	"github.com/meshlet/meshlet/proxy/l7"
)

// The engine's configuration types that xDS resources translate into. One
// place names them, so the translation reads in the engine's vocabulary.
type (
	engineConfig = l7.Config
	service      = l7.Service
	route        = l7.Route
	match        = l7.Match
	stringMatch  = l7.StringMatch
	destination  = l7.Destination
	rewrite      = l7.Rewrite
	retryPolicy  = l7.RetryPolicy
	fault        = l7.Fault
	faultDelay   = l7.FaultDelay
	faultAbort   = l7.FaultAbort
	mirror       = l7.Mirror
	headerPolicy = l7.HeaderPolicy
	headerOps    = l7.HeaderOps
	cluster      = l7.Cluster
	endpoint     = l7.Endpoint
	dnsDiscovery = l7.DNSDiscovery
	outlier      = l7.OutlierDetection
	upstreamTLS  = l7.UpstreamTLS
	portConfig   = l7.PortConfig
)

var dur = l7.D

// Applier is the engine side of the client: Apply validates a whole
// configuration, compiles it and swaps it in atomically, or returns an
// error naming the field and keeps serving the previous one.
type Applier interface {
	Apply(cfg l7.Config) error
}

// ApplierFunc adapts a function to Applier.
type ApplierFunc func(cfg l7.Config) error

// Apply calls f.
func (f ApplierFunc) Apply(cfg l7.Config) error { return f(cfg) }
