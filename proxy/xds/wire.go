package xds

import (
	"google.golang.org/protobuf/encoding/protowire"
)

// Reading an encoded resource without decoding it, so that an update
// decodes (and checks, and translates) only what changed: a resource whose
// bytes are the ones it was accepted with keeps its translation, and a
// RouteConfiguration is decoded one virtual host at a time. Equal bytes are
// an equal message; unequal bytes may still be an equal message (map
// order), which is decoded again — correct, only slower.

// wireName returns field 1 of an encoded message — the name of every type
// the client subscribes to (Listener.name, RouteConfiguration.name,
// Cluster.name, ClusterLoadAssignment.cluster_name, VirtualHost.name) —
// the last occurrence, as a parser keeps it. ok is false when b is not
// well formed.
func wireName(b []byte) (name []byte, ok bool) {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, false
		}
		b = b[n:]
		if num == 1 && typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return nil, false
			}
			name, b = v, b[n:]
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return nil, false
		}
		b = b[n:]
	}
	return name, true
}

// splitField separates the occurrences of the length-delimited field num
// of an encoded message (a repeated message field's elements, in order)
// from the rest, which is returned re-encoded without them. ok is false
// when b is not well formed or field num is not length-delimited.
func splitField(b []byte, num protowire.Number) (rest []byte, elems [][]byte, ok bool) {
	rest = make([]byte, 0, 64)
	for len(b) > 0 {
		fnum, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return nil, nil, false
		}
		if fnum == num {
			if typ != protowire.BytesType {
				return nil, nil, false
			}
			v, m := protowire.ConsumeBytes(b[n:])
			if m < 0 {
				return nil, nil, false
			}
			elems = append(elems, v)
			b = b[n+m:]
			continue
		}
		m := protowire.ConsumeFieldValue(fnum, typ, b[n:])
		if m < 0 {
			return nil, nil, false
		}
		rest = append(rest, b[:n+m]...)
		b = b[n+m:]
	}
	return rest, elems, true
}
