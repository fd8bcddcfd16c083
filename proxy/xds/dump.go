package xds

import (
	"maps"
	"slices"

	adminv3 "github.com/envoyproxy/go-control-plane/envoy/admin/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Dump returns the xDS resources in Envoy's /config_dump shape: an
// admin.v3.ConfigDump whose configs are a ClustersConfigDump, a
// ListenersConfigDump, a RoutesConfigDump and (with includeEDS, as Envoy's
// ?include_eds) an EndpointsConfigDump, each resource with its version and
// last update time; a rejected update shows as the error_state of the
// resources it carried (details: the NACK message).
func (c *Client) Dump(includeEDS bool) *adminv3.ConfigDump {
	c.mu.Lock()
	defer c.mu.Unlock()
	ts := timestamppb.New
	errState := func(t, name string) *adminv3.UpdateFailureState {
		n := c.nacks[t]
		if n == nil {
			return nil
		}
		raw, ok := n.rejected[name]
		if !ok && len(n.rejected) > 0 {
			return nil
		}
		return &adminv3.UpdateFailureState{FailedConfiguration: raw, LastUpdateAttempt: ts(n.at), Details: n.details, VersionInfo: n.version}
	}
	names := func(t string) []string {
		set := map[string]bool{}
		for n := range c.res[t].entries {
			set[n] = true
		}
		if n := c.nacks[t]; n != nil {
			for name := range n.rejected {
				set[name] = true
			}
		}
		return slices.Sorted(maps.Keys(set))
	}
	warming := map[string]bool{}
	if c.tbl != nil {
		for _, n := range c.tbl.warmingClusters {
			warming[n] = true
		}
	}
	var configs []*anypb.Any
	add := func(m proto.Message) {
		a, err := anypb.New(m)
		if err == nil {
			configs = append(configs, a)
		}
	}

	cd := &adminv3.ClustersConfigDump{VersionInfo: c.res[ClusterType].version}
	for _, n := range names(ClusterType) {
		dc := &adminv3.ClustersConfigDump_DynamicCluster{ErrorState: errState(ClusterType, n)}
		if e := c.res[ClusterType].entries[n]; e != nil {
			dc.VersionInfo, dc.Cluster, dc.LastUpdated = e.version, e.raw, ts(e.updated)
		}
		if warming[n] {
			cd.DynamicWarmingClusters = append(cd.DynamicWarmingClusters, dc)
		} else {
			cd.DynamicActiveClusters = append(cd.DynamicActiveClusters, dc)
		}
	}
	add(cd)

	ld := &adminv3.ListenersConfigDump{VersionInfo: c.res[ListenerType].version}
	for _, n := range names(ListenerType) {
		dl := &adminv3.ListenersConfigDump_DynamicListener{Name: n, ErrorState: errState(ListenerType, n)}
		if e := c.res[ListenerType].entries[n]; e != nil {
			dl.ActiveState = &adminv3.ListenersConfigDump_DynamicListenerState{VersionInfo: e.version, Listener: e.raw, LastUpdated: ts(e.updated)}
		}
		ld.DynamicListeners = append(ld.DynamicListeners, dl)
	}
	add(ld)

	rd := &adminv3.RoutesConfigDump{}
	for _, n := range names(RouteType) {
		dr := &adminv3.RoutesConfigDump_DynamicRouteConfig{ErrorState: errState(RouteType, n)}
		if e := c.res[RouteType].entries[n]; e != nil {
			dr.VersionInfo, dr.RouteConfig, dr.LastUpdated = e.version, e.raw, ts(e.updated)
		}
		rd.DynamicRouteConfigs = append(rd.DynamicRouteConfigs, dr)
	}
	add(rd)

	if includeEDS {
		ed := &adminv3.EndpointsConfigDump{}
		for _, n := range names(EndpointType) {
			de := &adminv3.EndpointsConfigDump_DynamicEndpointConfig{ErrorState: errState(EndpointType, n)}
			if e := c.res[EndpointType].entries[n]; e != nil {
				de.VersionInfo, de.EndpointConfig, de.LastUpdated = e.version, e.raw, ts(e.updated)
			}
			ed.DynamicEndpointConfigs = append(ed.DynamicEndpointConfigs, de)
		}
		add(ed)
	}
	return &adminv3.ConfigDump{Configs: configs}
}

// ConfigDump is Dump as Envoy prints it (protojson, proto field names).
func (c *Client) ConfigDump(includeEDS bool) ([]byte, error) {
	return protojson.MarshalOptions{UseProtoNames: true}.Marshal(c.Dump(includeEDS))
}

// Info is Status, for the generation's /server_info.
func (c *Client) Info() any { return c.Status() }
