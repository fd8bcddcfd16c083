package app

import (
	"slices"
	"testing"
)

func TestArgs(t *testing.T) {
	for _, tc := range []struct{ argv, want []string }{
		{[]string{"/usr/local/bin/meshlet", "agent", "--config", "c"}, []string{"agent", "--config", "c"}},
		{[]string{"/opt/cni/bin/meshlet-cni"}, []string{"cni"}},
		{[]string{"meshlet-cni", "--version"}, []string{"cni", "--version"}},
		{[]string{"/opt/cni/bin/meshlet"}, []string{}},
		{nil, nil},
	} {
		if got := Args(tc.argv); !slices.Equal(got, tc.want) {
			t.Errorf("Args(%q) = %q, want %q", tc.argv, got, tc.want)
		}
	}
}
