package agent

import (
	"runtime/debug"
	"slices"
	"strings"
	"testing"
)

func TestGenerationEnvPausesGC(t *testing.T) {
	for _, tc := range []struct {
		name string
		base []string
		want []string
	}{
		{"unset", []string{"PATH=/bin", "HOME=/"}, []string{"PATH=/bin", "HOME=/", "X=1", "GOGC=off", EnvStartGOGC + "="}},
		{"operator value kept", []string{"GOGC=50", "PATH=/bin"}, []string{"PATH=/bin", "X=1", "GOGC=off", EnvStartGOGC + "=50"}},
		{"stale marker replaced", []string{EnvStartGOGC + "=7", "GOGC=off"}, []string{"X=1", "GOGC=off", EnvStartGOGC + "=off"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := generationEnv(tc.base, "X=1")
			if !slices.Equal(got, tc.want) {
				t.Fatalf("generationEnv(%q) = %q, want %q", tc.base, got, tc.want)
			}
		})
	}
}

func TestRestoreGC(t *testing.T) {
	defer debug.SetGCPercent(debug.SetGCPercent(100))
	for _, tc := range []struct {
		orig string
		want int
	}{{"", 100}, {"off", -1}, {"25", 25}, {" 200 ", 200}} {
		debug.SetGCPercent(-1)
		if err := RestoreGC(tc.orig); err != nil {
			t.Fatalf("RestoreGC(%q): %v", tc.orig, err)
		}
		if got := debug.SetGCPercent(-1); got != tc.want {
			t.Errorf("RestoreGC(%q): GC percent %d, want %d", tc.orig, got, tc.want)
		}
	}
	debug.SetGCPercent(-1)
	err := RestoreGC("lots")
	if err == nil || !strings.Contains(err.Error(), `"lots"`) || !strings.Contains(err.Error(), EnvStartGOGC) {
		t.Fatalf("RestoreGC(lots) = %v, want an error naming %s and the value", err, EnvStartGOGC)
	}
	if got := debug.SetGCPercent(-1); got != -1 {
		t.Errorf("a bad value changed the GC percent to %d", got)
	}
}
