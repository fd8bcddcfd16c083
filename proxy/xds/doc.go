// Package xds is the proxy's xDS client: one ADS stream per proxy
// generation to the discovery server (delta xDS, or state of the world
// when the server has no delta), in the resource contract of docs/xds.md.
//
// Each response is checked as a whole — every set field of every resource
// is walked against the fields the contract lists, and translated into the
// engine's configuration (services, routes, clusters, endpoints) — then
// the complete configuration is handed to the engine (Applier), which
// compiles it and swaps it in atomically. A response the proxy cannot
// apply is NACKed with a message naming the resource and the field
// ("Cluster outbound|80||a.ns.svc.cluster.local: lb_policy: RING_HASH is
// not supported"), and the previous configuration keeps serving.
//
// Warming as Envoy does it: a new cluster is put in the table only once its
// endpoints arrived, a listener's routes only once its route configuration
// arrived; until then the previous version (if any) keeps serving and a
// route to a cluster not in the table answers 503 NC. The client is ready
// once a complete configuration serves.
//
// The last applied resources are persisted (Options.StateFile, in the
// pod's runtime volume), so that a generation starting while the control
// plane is unreachable serves them at once (LoadPersisted) and says so
// (Status.Source "persisted", meshlet_xds_persisted_config, a log line);
// on reconnect it resubscribes with the versions it holds.
package xds
