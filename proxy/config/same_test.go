package config

import (
	"reflect"
	"testing"
)

// TestSameLooksAtEveryField: a shallow copy of a cluster or service is
// the same; a copy with any one field changed (a top-level field, or one
// inside the connection pool and its durations; a list with the same
// elements in other memory) is not — including fields added later, since
// the walk is over the type.
func TestSameLooksAtEveryField(t *testing.T) {
	cl := Cluster{Name: "c", Endpoints: []Endpoint{{Address: "10.0.0.1:80"}}, Subsets: []Subset{{Name: "v1", Labels: map[string]string{"v": "1"}}},
		Pool: ConnectionPool{MaxConnections: 3, IdleTimeout: D(1)}, Outlier: &OutlierDetection{Consecutive5xx: 1}}
	svc := Service{Name: "s", Hosts: []string{"h"}, Routes: []Route{{Name: "r", Destinations: []Destination{{Cluster: "c"}}}}}
	check := func(name string, a any, same func(a, b any) bool) {
		v := reflect.ValueOf(a)
		cp := reflect.New(v.Type()).Elem()
		cp.Set(v)
		if !same(v.Interface(), cp.Interface()) {
			t.Errorf("%s: a shallow copy is not the same", name)
		}
		var walk func(path string, f reflect.Value)
		walk = func(path string, f reflect.Value) {
			if f.Kind() == reflect.Struct {
				for i := range f.NumField() {
					if f.Type().Field(i).IsExported() {
						walk(path+"."+f.Type().Field(i).Name, f.Field(i))
					}
				}
				return
			}
			old := reflect.New(f.Type()).Elem()
			old.Set(f)
			f.Set(changed(f))
			if same(v.Interface(), cp.Interface()) {
				t.Errorf("%s%s changed, still the same", name, path)
			}
			f.Set(old)
		}
		walk("", cp)
	}
	check("cluster", cl, func(a, b any) bool { x, y := a.(Cluster), b.(Cluster); return SameCluster(&x, &y) })
	check("service", svc, func(a, b any) bool { x, y := a.(Service), b.(Service); return SameService(&x, &y) })
}

// changed returns a value of f's type other than f's.
func changed(f reflect.Value) reflect.Value {
	v := reflect.New(f.Type()).Elem()
	switch f.Kind() {
	case reflect.String:
		v.SetString(f.String() + "x")
	case reflect.Bool:
		v.SetBool(!f.Bool())
	case reflect.Int, reflect.Int64, reflect.Int32:
		v.SetInt(f.Int() + 1)
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		v.SetUint(f.Uint() + 1)
	case reflect.Float64, reflect.Float32:
		v.SetFloat(f.Float() + 1)
	case reflect.Slice: // the same elements in other memory (a length of 1 for none)
		v = reflect.MakeSlice(f.Type(), max(f.Len(), 1), max(f.Len(), 1))
		reflect.Copy(v, f)
	case reflect.Map:
		v = reflect.MakeMap(f.Type())
	case reflect.Pointer:
		v = reflect.New(f.Type().Elem())
	}
	return v
}
