package agent

import (
	"fmt"
	"runtime/debug"
	"strconv"
	"strings"
)

// EnvStartGOGC carries the operator's GOGC (empty when unset) to a
// generation, which the agent starts with GOGC=off: the few megabytes every
// package initialiser of the one meshlet binary allocates would otherwise
// cost a collection (about a sixth of a generation's start-up CPU) before
// the new generation can serve. The generation puts the operator's setting
// back as soon as it is ready (RestoreGC).
const EnvStartGOGC = "MESHLET_GOGC"

// generationEnv is base with the collector paused for start-up: GOGC=off,
// and the previous GOGC, if any, kept in EnvStartGOGC.
func generationEnv(base []string, extra ...string) []string {
	env := make([]string, 0, len(base)+len(extra)+2)
	orig := ""
	for _, kv := range base {
		switch {
		case strings.HasPrefix(kv, "GOGC="):
			orig = strings.TrimPrefix(kv, "GOGC=")
		case strings.HasPrefix(kv, EnvStartGOGC+"="):
		default:
			env = append(env, kv)
		}
	}
	env = append(env, extra...)
	return append(env, "GOGC=off", EnvStartGOGC+"="+orig)
}

// RestoreGC sets the collector back to the operator's GOGC value orig
// (EnvStartGOGC's value: empty means the default 100, "off" disables it)
// and returns the heap the initialisers left behind to the kernel.
func RestoreGC(orig string) error {
	pct := 100
	switch orig = strings.TrimSpace(orig); orig {
	case "":
	case "off":
		pct = -1
	default:
		n, err := strconv.Atoi(orig)
		if err != nil {
			return fmt.Errorf("%s: invalid GOGC value %q", EnvStartGOGC, orig)
		}
		pct = n
	}
	debug.SetGCPercent(pct)
	if pct >= 0 {
		debug.FreeOSMemory()
	}
	return nil
}
