// Package translate turns Kubernetes service discovery (Services,
// EndpointSlices, Pods) and Istio's traffic API (networking.istio.io/v1
// VirtualService, DestinationRule, ServiceEntry, Sidecar) into the Envoy v3
// resources one proxy should receive, as docs/xds.md describes them.
//
// It is pure: Compile indexes one consistent set of inputs into a Mesh
// (and reports the resources it refuses, each with the field that made it
// refuse), and Mesh.ForProxy builds the listeners, routes, clusters and
// endpoints of one proxy from it. Neither reads the network or the clock.
package translate
