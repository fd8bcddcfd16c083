package config

import "reflect"

// SameCluster reports whether b is a unchanged in the sense an update
// needs: equal names, numbers and strings, and lists, maps and pointers
// that are the same memory (so their contents are equal too). A
// configuration is not edited once it is handed over (an engine keeps it),
// so a producer that keeps what did not change — an xDS client reusing the
// translation of a resource whose bytes did not change — makes its
// unchanged clusters the same; anything else reads as changed, which costs
// a check, never a wrong result. It looks at every field (by reflection), so
// a field added to Cluster is compared without being named here.
func SameCluster(a, b *Cluster) bool {
	return a == b || same(reflect.ValueOf(a).Elem(), reflect.ValueOf(b).Elem())
}

// SameService is SameCluster for a service.
func SameService(a, b *Service) bool {
	return a == b || same(reflect.ValueOf(a).Elem(), reflect.ValueOf(b).Elem())
}

// same is the shallow identity SameCluster describes.
func same(a, b reflect.Value) bool {
	switch a.Kind() {
	case reflect.Struct:
		for i := range a.NumField() {
			if !same(a.Field(i), b.Field(i)) {
				return false
			}
		}
		return true
	case reflect.Slice:
		return a.Len() == b.Len() && (a.Len() == 0 || a.Pointer() == b.Pointer())
	case reflect.Map, reflect.Pointer:
		return a.Pointer() == b.Pointer()
	case reflect.String:
		return a.String() == b.String()
	case reflect.Bool:
		return a.Bool() == b.Bool()
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return a.Int() == b.Int()
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return a.Uint() == b.Uint()
	case reflect.Float32, reflect.Float64:
		return a.Float() == b.Float()
	case reflect.Func, reflect.Interface:
		return a.IsNil() && b.IsNil()
	}
	return false // anything else: changed
}
