package capture

import (
	"reflect"
	"testing"
)

// TestOptionSetCoversOptions: every Options field has exactly one entry in
// the option set, the entry reads and writes that very field, and no two
// entries share a flag, env var, key or annotation.
func TestOptionSetCoversOptions(t *testing.T) {
	t.Parallel()
	typ := reflect.TypeFor[Options]()
	if len(OptionSet) != typ.NumField() {
		t.Errorf("option set has %d entries, Options %d fields", len(OptionSet), typ.NumField())
	}
	seen := map[string]string{}
	unique := func(kind, v, field string) {
		if v == "" {
			return
		}
		if prev, ok := seen[kind+v]; ok {
			t.Errorf("%s %q used by %s and %s", kind, v, prev, field)
		}
		seen[kind+v] = field
	}
	for _, opt := range OptionSet {
		f, ok := typ.FieldByName(opt.Field)
		if !ok {
			t.Errorf("%s is not an Options field", opt.Field)
			continue
		}
		var o Options
		*opt.Ptr(&o) = "marker"
		if got := reflect.ValueOf(o).FieldByIndex(f.Index).String(); got != "marker" {
			t.Errorf("%s: Ptr writes another field", opt.Field)
		}
		if opt.Long == "" || opt.Env == "" || opt.Key == "" || opt.Usage == "" {
			t.Errorf("%s lacks a name: %+v", opt.Field, opt)
		}
		unique("field", opt.Field, opt.Field)
		unique("short", opt.Short, opt.Field)
		unique("long", opt.Long, opt.Field)
		unique("env", opt.Env, opt.Field)
		unique("key", opt.Key, opt.Field)
		unique("annotation", opt.Annotation, opt.Field)
	}
}

// TestApplyAnnotations: an annotation replaces the configured value, except
// excludeInboundPorts, which adds to it (Istio's meaning); the result says
// which annotation set which field.
func TestApplyAnnotations(t *testing.T) {
	t.Parallel()
	o := NewOptions()
	from := ApplyAnnotations(&o, map[string]string{
		AnnotationIncludeInboundPorts: "8080",
		AnnotationExcludeInboundPorts: "9090",
		"unrelated":                   "x",
	})
	if o.InboundPorts != "8080" || o.InboundPortsExclude != DefaultInboundPortsExclude+",9090" {
		t.Errorf("got -b %q -d %q", o.InboundPorts, o.InboundPortsExclude)
	}
	if len(from) != 2 || from["InboundPorts"] != AnnotationIncludeInboundPorts || from["InboundPortsExclude"] != AnnotationExcludeInboundPorts {
		t.Errorf("from = %v", from)
	}
	o = NewOptions()
	o.InboundPortsExclude = ""
	ApplyAnnotations(&o, map[string]string{AnnotationExcludeInboundPorts: "9090"})
	if o.InboundPortsExclude != "9090" {
		t.Errorf("-d %q, want 9090", o.InboundPortsExclude)
	}
}

// TestArgs: the rendered arguments name every short flag once, in the
// option set's order, and --ipv6 only when it is not auto.
func TestArgs(t *testing.T) {
	t.Parallel()
	o := NewOptions()
	got := o.Args()
	want := []string{"-p", "15001", "-z", "15006", "-u", "1337", "-g", "1337", "-m", "REDIRECT", "-i", "*", "-x", "",
		"-b", "*", "-d", "22,15090,15021,15020", "-q", "", "-o", "", "-c", ""}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("Args() = %q\nwant %q", got, want)
	}
	o.IPv6 = "off"
	if got := o.Args(); got[len(got)-2] != "--ipv6" || got[len(got)-1] != "off" {
		t.Errorf("--ipv6 off not rendered: %q", got)
	}
}
