package l7

import "github.com/meshlet/meshlet/proxy/l7/upstream"

// DialFunc dials an upstream. dir tells inbound (to the local app, which the
// sidecar dials from 127.0.0.6) from outbound.
type DialFunc = upstream.DialFunc

// Resolver resolves host names; *net.Resolver implements it. Tests pass
// their own so nothing outside the machine is ever asked.
type Resolver = upstream.Resolver
