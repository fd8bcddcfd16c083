// Package upstream is the L7 engine's side towards the endpoints: clusters
// with their endpoints and subsets, the balancers (round robin, least
// request by power of two choices, Peak-EWMA), the circuit breaker,
// passive outlier detection and active health checks (HTTP, gRPC, TCP),
// DNS clusters, the upstream connection pools (net/http's for HTTP/2 and
// streamed requests, the HTTP/1.1 fast path of h1transport.go for the
// rest) and TLS origination.
//
// A Cluster is built from a validated config.Cluster and lives as long as
// the engine's tables refer to it: an update whose settings for the
// cluster are unchanged keeps it (SetStatic replaces its endpoints), any
// other retires it (Retire). The engine's router decides retries; it asks
// a cluster to admit a request (Admit), pick an endpoint (Pick), send an
// attempt (RoundTrip) and learn from its outcome (Record, ObserveRTT).
package upstream
