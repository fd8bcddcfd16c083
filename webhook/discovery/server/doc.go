// Package server is `meshlet discovery`'s control plane: shared informers
// over Kubernetes service discovery and Istio's networking API feed
// translate.Compile; a debounced push builds each connected proxy's
// resources (once per distinct proxy shape) into a versioned snapshot of
// go-control-plane's cache, which its ADS server (state of the world and
// delta) serves. Every response, ACK and NACK is recorded per proxy and
// type for `meshlet proxy-status`.
package server
