// Command meshlet is the one binary of the meshlet service mesh: the admission
// webhook, the manual injector, the capture-rule installer (init container and
// CNI plugin), the sidecar agent and the proxy are all subcommands of it, so one
// image serves every container.
package main

import (
	"os"

	"github.com/meshlet/meshlet/cmd/meshlet/app"
)

func main() {
	os.Exit(app.Main())
}
