// Package meshports names the fixed ports of a meshlet pod. They are Istio's
// port map, so Istio tooling and habits carry over; every package that needs
// one of them takes it from here instead of writing the number.
package meshports

import "strconv"

// The ports of the sidecar and of the capture rules.
const (
	// Admin is the proxy's admin endpoint (127.0.0.1 only).
	Admin = 15000
	// Outbound is the outbound capture listener (istio-iptables -p).
	Outbound = 15001
	// ValidationProbe is the port the capture validation probe dials; nothing
	// listens on it.
	ValidationProbe = 15002
	// Inbound is the inbound capture listener (istio-iptables -z).
	Inbound = 15006
	// Tunnel is reserved for the tunnel; it is never captured inbound.
	Tunnel = 15008
	// Status is the agent's status server (/healthz/ready, /stats/prometheus,
	// /quitquitquit, /drain).
	Status = 15020
	// Health is the proxy's readiness endpoint through the data path.
	Health = 15021
	// Prometheus is the proxy's metrics listener (port name http-envoy-prom).
	Prometheus = 15090
)

// Sidecar lists the ports the sidecar itself listens on or reserves, so an
// application container cannot use them.
var Sidecar = []int32{Admin, Outbound, Inbound, Tunnel, Status, Health, Prometheus}

// NeverCapturedInbound lists the sidecar's own ports that inbound capture
// always leaves alone (besides Tunnel, which the capture rules add
// themselves), in the order the injector passes them to `meshlet init -d`.
var NeverCapturedInbound = []uint16{Prometheus, Health, Status}

// Addr is the listen address of port on every interface (":port").
func Addr(port int) string { return ":" + strconv.Itoa(port) }

// LoopbackAddr is the address of port on 127.0.0.1, for the listeners only
// the pod itself may reach.
func LoopbackAddr(port int) string { return "127.0.0.1:" + strconv.Itoa(port) }
