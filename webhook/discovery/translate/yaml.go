package translate

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"

	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istioscheme "istio.io/client-go/pkg/clientset/versioned/scheme"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	kubescheme "k8s.io/client-go/kubernetes/scheme"
)

// Scheme knows the Kubernetes and Istio kinds the translation reads.
var Scheme = func() *runtime.Scheme {
	s := runtime.NewScheme()
	if err := errors.Join(kubescheme.AddToScheme(s), istioscheme.AddToScheme(s)); err != nil {
		panic(err) // static registration of generated types
	}
	return s
}()

// DecodeYAML decodes a multi-document YAML stream of Kubernetes and Istio
// objects. Unknown fields are errors naming the document.
func DecodeYAML(data []byte) ([]runtime.Object, error) {
	dec := serializer.NewCodecFactory(Scheme, serializer.EnableStrict).UniversalDeserializer()
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var out []runtime.Object
	for i := 0; ; i++ {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return nil, fmt.Errorf("reading YAML document %d: %w", i, err)
		}
		if onlyComments(doc) {
			continue
		}
		obj, _, err := dec.Decode(doc, nil, nil)
		if err != nil {
			return nil, fmt.Errorf("decoding YAML document %d: %w", i, err)
		}
		out = append(out, obj)
	}
}

// AddObjects sorts objects into in by kind; other kinds are returned.
func (in *Inputs) AddObjects(objs ...runtime.Object) []runtime.Object {
	var rest []runtime.Object
	for _, o := range objs {
		switch t := o.(type) {
		case *corev1.Service:
			in.Services = append(in.Services, t)
		case *discoveryv1.EndpointSlice:
			in.EndpointSlices = append(in.EndpointSlices, t)
		case *corev1.Pod:
			in.Pods = append(in.Pods, t)
		case *corev1.Namespace:
			in.Namespaces = append(in.Namespaces, t)
		case *networkingv1.VirtualService:
			in.VirtualServices = append(in.VirtualServices, t)
		case *networkingv1.DestinationRule:
			in.DestinationRules = append(in.DestinationRules, t)
		case *networkingv1.ServiceEntry:
			in.ServiceEntries = append(in.ServiceEntries, t)
		case *networkingv1.Sidecar:
			in.Sidecars = append(in.Sidecars, t)
		default:
			rest = append(rest, in.Security.AddObjects(o)...)
		}
	}
	return rest
}

// onlyComments reports whether a YAML document holds nothing but blank
// lines, comments and separators.
func onlyComments(doc []byte) bool {
	for _, line := range bytes.Split(doc, []byte("\n")) {
		l := bytes.TrimSpace(line)
		if len(l) > 0 && l[0] != '#' && !bytes.Equal(l, []byte("---")) {
			return false
		}
	}
	return true
}
