package cni

import (
	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/meshlet/meshlet/initcni/cni"
)

func skelMain(p *cni.Plugin) *types.Error {
	return skel.PluginMainFuncsWithError(p.Funcs(), cni.SupportedVersions, cni.About)
}
