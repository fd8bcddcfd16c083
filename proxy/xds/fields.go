package xds

import (
	"fmt"
	"sort"
	"strings"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

// schema lists the fields of a resource (and of the typed configs inside
// it) that the proxy honours or accepts as informational, as dotted paths
// of protobuf field names without indices or map keys. A path ending in
// "/*" accepts its whole subtree (metadata, config sources). Any typed
// config (google.protobuf.Any) on an accepted path is decoded and walked
// under the same path, so its fields are listed like nested ones, e.g.
// "filter_chains.filters.typed_config.rds.route_config_name".
type schema map[string]bool

func newSchema(paths ...string) schema {
	s := schema{}
	for _, p := range paths {
		subtree := strings.HasSuffix(p, "/*")
		p = strings.TrimSuffix(p, "/*")
		// Every parent of a listed field is walked into.
		for i := range len(p) {
			if p[i] == '.' && !s[p[:i]] {
				s[p[:i]] = false
			}
		}
		s[p] = s[p] || subtree
	}
	return s
}

// anyTypes are the typed configs the proxy understands, by type URL.
var anyTypes = map[string]bool{}

// check walks every set field of m and returns one error per field the
// schema does not list (path with indices and map keys, so the message
// points at the exact field), and per unknown protobuf field.
func (s schema) check(m proto.Message) []string {
	var errs []string
	s.walk(m.ProtoReflect(), "", "", &errs)
	sort.Strings(errs)
	return errs
}

func (s schema) walk(m protoreflect.Message, key, shown string, errs *[]string) {
	if len(m.GetUnknown()) > 0 {
		*errs = append(*errs, fmt.Sprintf("%s: unknown fields (a newer schema than this proxy knows)", orRoot(shown)))
	}
	if m.Descriptor().FullName() == "google.protobuf.Any" {
		a, ok := m.Interface().(*anypb.Any)
		if !ok {
			return
		}
		inner, err := a.UnmarshalNew()
		if err != nil {
			*errs = append(*errs, fmt.Sprintf("%s: typed config %s cannot be decoded: %v", orRoot(shown), a.GetTypeUrl(), err))
			return
		}
		if !anyTypes[a.GetTypeUrl()] {
			*errs = append(*errs, fmt.Sprintf("%s: typed config %s is not supported", orRoot(shown), a.GetTypeUrl()))
			return
		}
		s.walk(inner.ProtoReflect(), key, shown, errs)
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		name := string(fd.Name())
		k := join(key, name)
		sh := join(shown, name)
		subtree, ok := s[k]
		if !ok {
			*errs = append(*errs, fmt.Sprintf("%s: not supported", sh))
			return true
		}
		if subtree || fd.Kind() != protoreflect.MessageKind && fd.Kind() != protoreflect.GroupKind {
			return true
		}
		switch {
		case fd.IsList():
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				s.walk(l.Get(i).Message(), k, fmt.Sprintf("%s[%d]", sh, i), errs)
			}
		case fd.IsMap():
			v.Map().Range(func(mk protoreflect.MapKey, mv protoreflect.Value) bool {
				if fd.MapValue().Kind() == protoreflect.MessageKind {
					s.walk(mv.Message(), k, fmt.Sprintf("%s[%q]", sh, mk.String()), errs)
				}
				return true
			})
		default:
			if isWellKnownLeaf(fd.Message().FullName()) {
				return true
			}
			s.walk(v.Message(), k, sh, errs)
		}
		return true
	})
}

// isWellKnownLeaf reports messages that hold one value (durations,
// wrappers): their inner fields are never listed.
func isWellKnownLeaf(n protoreflect.FullName) bool {
	switch n {
	case "google.protobuf.Duration", "google.protobuf.Timestamp", "google.protobuf.UInt32Value",
		"google.protobuf.UInt64Value", "google.protobuf.BoolValue", "google.protobuf.StringValue",
		"google.protobuf.Int64Value", "google.protobuf.Int32Value", "google.protobuf.DoubleValue":
		return true
	}
	return false
}

func join(a, b string) string {
	if a == "" {
		return b
	}
	return a + "." + b
}

func orRoot(s string) string {
	if s == "" {
		return "(resource)"
	}
	return s
}
