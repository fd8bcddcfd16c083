package capture

import "flag"

// flagLookup lets the external test package see the -update flag defined in
// the internal one.
var FlagLookup = flag.Lookup
