package xds

import (
	"fmt"
	"sort"
	"strconv"
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
// "filter_chains.filters.typed_config.rds.route_config_name". The paths
// are compiled into a tree, walked once per resource without building
// strings; a path is spelled out only for a field that is refused.
type schema = *schemaNode

type schemaNode struct {
	subtree  bool // accept everything below
	children map[protoreflect.Name]*schemaNode
}

func newSchema(paths ...string) schema {
	root := &schemaNode{}
	for _, p := range paths {
		subtree := strings.HasSuffix(p, "/*")
		n := root
		for _, part := range strings.Split(strings.TrimSuffix(p, "/*"), ".") {
			if n.children == nil {
				n.children = map[protoreflect.Name]*schemaNode{}
			}
			c := n.children[protoreflect.Name(part)]
			if c == nil {
				c = &schemaNode{}
				n.children[protoreflect.Name(part)] = c
			}
			n = c
		}
		n.subtree = n.subtree || subtree
	}
	return root
}

// anyTypes are the typed configs the proxy understands, by type URL.
var anyTypes = map[string]bool{}

// pathElem is one step of the path to a field, spelled out on error only.
type pathElem struct {
	parent *pathElem
	name   protoreflect.Name
	index  int    // list index, or -1
	key    string // map key (quoted), or ""
}

func (p *pathElem) String() string {
	if p == nil {
		return "(resource)"
	}
	var parts []*pathElem
	for e := p; e != nil; e = e.parent {
		parts = append(parts, e)
	}
	var b strings.Builder
	for i := len(parts) - 1; i >= 0; i-- {
		e := parts[i]
		if e.name != "" {
			if b.Len() > 0 {
				b.WriteByte('.')
			}
			b.WriteString(string(e.name))
		}
		switch {
		case e.index >= 0:
			b.WriteString("[" + strconv.Itoa(e.index) + "]")
		case e.key != "":
			b.WriteString("[" + e.key + "]")
		}
	}
	return b.String()
}

// check walks every set field of m and returns one error per field the
// schema does not list (path with indices and map keys, so the message
// points at the exact field), and per unknown protobuf field.
func (s *schemaNode) check(m proto.Message) []string {
	var errs []string
	s.walk(m.ProtoReflect(), nil, &errs)
	sort.Strings(errs)
	return errs
}

func (s *schemaNode) walk(m protoreflect.Message, at *pathElem, errs *[]string) {
	if len(m.GetUnknown()) > 0 {
		*errs = append(*errs, fmt.Sprintf("%s: unknown fields (a newer schema than this proxy knows)", at))
	}
	if m.Descriptor().FullName() == "google.protobuf.Any" {
		a, ok := m.Interface().(*anypb.Any)
		if !ok {
			return
		}
		if !anyTypes[a.GetTypeUrl()] {
			*errs = append(*errs, fmt.Sprintf("%s: typed config %s is not supported", at, a.GetTypeUrl()))
			return
		}
		inner, err := a.UnmarshalNew()
		if err != nil {
			*errs = append(*errs, fmt.Sprintf("%s: typed config %s cannot be decoded: %v", at, a.GetTypeUrl(), err))
			return
		}
		s.walk(inner.ProtoReflect(), at, errs)
		return
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		child := s.children[fd.Name()]
		if child == nil {
			*errs = append(*errs, fmt.Sprintf("%s: not supported", &pathElem{parent: at, name: fd.Name(), index: -1}))
			return true
		}
		if child.subtree || fd.Kind() != protoreflect.MessageKind && fd.Kind() != protoreflect.GroupKind {
			return true
		}
		switch {
		case fd.IsList():
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				child.walk(l.Get(i).Message(), &pathElem{parent: at, name: fd.Name(), index: i}, errs)
			}
		case fd.IsMap():
			if fd.MapValue().Kind() != protoreflect.MessageKind {
				return true
			}
			v.Map().Range(func(mk protoreflect.MapKey, mv protoreflect.Value) bool {
				child.walk(mv.Message(), &pathElem{parent: at, name: fd.Name(), index: -1, key: strconv.Quote(mk.String())}, errs)
				return true
			})
		default:
			if isWellKnownLeaf(fd.Message().FullName()) {
				return true
			}
			child.walk(v.Message(), &pathElem{parent: at, name: fd.Name(), index: -1}, errs)
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
