// Package manifest applies the injection core to Kubernetes manifests: a
// stream of YAML or JSON documents. It finds every pod template (Pod, the
// workload kinds at spec.template, CronJob at spec.jobTemplate.spec.template,
// any other object with a pod template at spec.template, items of a List),
// runs inject.Inject or inject.Uninject on it, and writes back only what
// changed into the YAML node tree, so the order, comments and formatting of
// everything else survive. Documents without a pod template, and documents
// whose pod template is left unchanged, are returned byte for byte.
//
// Like package inject it does no I/O: bytes in, bytes out.
package manifest

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	kyaml "sigs.k8s.io/kustomize/kyaml/yaml"

	"github.com/meshlet/meshlet/webhook/inject"
)

// Format is an output format.
type Format string

// The output formats.
const (
	FormatYAML Format = "yaml"
	FormatJSON Format = "json"
)

// Options configure Transform.
type Options struct {
	// Uninject removes the sidecar instead of injecting it.
	Uninject bool
	// Config is the injection config (required unless Uninject).
	Config *inject.Config
	// Inject are the options passed to inject.Inject.
	Inject inject.Options
	// Format of the output; the zero value is YAML.
	Format Format
	// NamespaceLabels are the labels of every object's namespace (for
	// Inject.RequireOptIn).
	NamespaceLabels map[string]string
}

// ReasonInvalidObject is the reason of a Result whose object could not be
// read as a pod template.
const ReasonInvalidObject inject.Reason = "InvalidObject"

// Result describes one pod template found in the input.
type Result struct {
	// Doc is the 1-based index of the document in the input; Item the
	// 1-based index in a List (0 outside lists).
	Doc, Item int
	// Kind, Name and Namespace of the object holding the pod template.
	Kind, Name, Namespace string
	// Changed reports whether the pod template was modified.
	Changed bool
	// Decision is the injection decision (inject mode); in uninject mode
	// Decision.Message says what happened.
	Decision inject.Decision
}

// DocError is a problem with one document.
type DocError struct {
	// Doc is the 1-based index of the document.
	Doc int
	// Object names the object ("Deployment shop/web"), if known.
	Object string
	Err    error
}

func (e *DocError) Error() string {
	where := fmt.Sprintf("document %d", e.Doc)
	if e.Object != "" {
		where += " (" + e.Object + ")"
	}
	msg := e.Err.Error()
	if strings.Contains(msg, "\n") {
		// Several problems (errors.Join): one per line.
		return where + ":\n  " + strings.ReplaceAll(msg, "\n", "\n  ")
	}
	return where + ": " + msg
}

func (e *DocError) Unwrap() error { return e.Err }

// doc is one input document: its raw bytes, the separator line before it
// ("" for the first) and, after processing, its replacement.
type doc struct {
	sep     string
	raw     string
	node    *kyaml.Node // DocumentNode, nil for an empty document
	json    bool
	changed bool
	line    int // first line of raw in the input
}

// yamlLine finds the line numbers in YAML parser errors.
var yamlLine = regexp.MustCompile(`line (\d+)`)

// Transform injects (or uninjects) every pod template in data. On error
// (a malformed document, invalid annotations) it returns no output at all,
// and the error lists every bad document (errors.Join of *DocError).
func Transform(data []byte, opts Options) ([]byte, []Result, error) {
	if !opts.Uninject && opts.Config == nil {
		return nil, nil, errors.New("manifest: no injection config")
	}
	docs, err := split(data)
	var (
		results []Result
		errs    []error
	)
	if err != nil {
		errs = append(errs, err)
	}
	for i := range docs {
		d := &docs[i]
		if d.node == nil {
			continue
		}
		res, err := processDoc(d, i+1, opts)
		results = append(results, res...)
		if err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return nil, results, errors.Join(errs...)
	}
	out, err := render(docs, opts.Format)
	if err != nil {
		return nil, results, err
	}
	return out, results, nil
}

// split cuts data into documents and parses each.
func split(data []byte) ([]doc, error) {
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	if len(trimmed) > 0 && (trimmed[0] == '{' || trimmed[0] == '[') {
		return splitJSON(data)
	}
	var (
		docs []doc
		cur  strings.Builder
		sep  string
	)
	lineNo, start := 0, 1
	flush := func() {
		docs = append(docs, doc{sep: sep, raw: cur.String(), line: start})
		cur.Reset()
	}
	s := string(data)
	for len(s) > 0 {
		text := s
		if i := strings.IndexByte(s, '\n'); i >= 0 {
			text = s[:i+1]
		}
		s = s[len(text):]
		t := strings.TrimRight(text, "\r\n")
		lineNo++
		if t == "---" || strings.HasPrefix(t, "--- ") || strings.HasPrefix(t, "---\t") {
			flush()
			sep = text
			start = lineNo + 1
			continue
		}
		cur.WriteString(text)
	}
	flush()
	var errs []error
	for i := range docs {
		n, err := parseYAML(docs[i].raw)
		if err != nil {
			msg := yamlLine.ReplaceAllStringFunc(err.Error(), func(m string) string {
				n, _ := strconv.Atoi(yamlLine.FindStringSubmatch(m)[1])
				return fmt.Sprintf("line %d", n+docs[i].line-1)
			})
			errs = append(errs, &DocError{Doc: i + 1, Err: fmt.Errorf("malformed YAML (line numbers of the whole input): %s", msg)})
			continue
		}
		docs[i].node = n
	}
	return docs, errors.Join(errs...)
}

func parseYAML(s string) (*kyaml.Node, error) {
	var n kyaml.Node
	if err := kyaml.NewDecoder(strings.NewReader(s)).Decode(&n); err != nil {
		if errors.Is(err, io.EOF) {
			return nil, nil
		}
		return nil, err
	}
	if len(n.Content) == 0 {
		return nil, nil
	}
	return &n, nil
}

// splitJSON reads a stream of JSON values; a top-level array is a list of
// documents.
func splitJSON(data []byte) ([]doc, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	var (
		docs []doc
		prev int64
	)
	for {
		var raw json.RawMessage
		err := dec.Decode(&raw)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, &DocError{Doc: len(docs) + 1, Err: fmt.Errorf("malformed JSON: %w", err)}
		}
		off := dec.InputOffset()
		text := string(data[prev:off])
		prev = off
		if t := bytes.TrimSpace(raw); len(t) > 0 && t[0] == '[' {
			var items []json.RawMessage
			if err := json.Unmarshal(raw, &items); err != nil {
				return nil, &DocError{Doc: len(docs) + 1, Err: fmt.Errorf("malformed JSON: %w", err)}
			}
			for _, it := range items {
				n, err := parseYAML(string(it))
				if err != nil {
					return nil, &DocError{Doc: len(docs) + 1, Err: fmt.Errorf("malformed JSON: %w", err)}
				}
				docs = append(docs, doc{raw: string(it), node: n, json: true, sep: "\n"})
			}
			continue
		}
		n, err := parseYAML(string(raw))
		if err != nil {
			return nil, &DocError{Doc: len(docs) + 1, Err: fmt.Errorf("malformed JSON: %w", err)}
		}
		docs = append(docs, doc{raw: text, node: n, json: true})
	}
	if len(docs) > 0 {
		docs[0].sep = ""
	}
	return docs, nil
}

// processDoc handles one document: an object or a List of objects.
func processDoc(d *doc, index int, opts Options) ([]Result, error) {
	root := d.node.Content[0]
	if root.Kind != kyaml.MappingNode {
		return nil, nil
	}
	kind := scalar(root, "kind")
	if items := get(root, "items"); strings.HasSuffix(kind, "List") && items != nil && items.Kind == kyaml.SequenceNode {
		var (
			results []Result
			errs    []error
		)
		for j, it := range items.Content {
			r, changed, err := processObject(it, index, j+1, opts)
			if r != nil {
				results = append(results, *r)
			}
			if err != nil {
				errs = append(errs, err)
			}
			d.changed = d.changed || changed
		}
		return results, errors.Join(errs...)
	}
	r, changed, err := processObject(root, index, 0, opts)
	d.changed = changed
	if r == nil {
		return nil, err
	}
	return []Result{*r}, err
}

// processObject injects the pod template of obj, if it has one.
func processObject(obj *kyaml.Node, index, item int, opts Options) (*Result, bool, error) {
	if obj.Kind != kyaml.MappingNode {
		return nil, false, nil
	}
	kind := scalar(obj, "kind")
	meta := get(obj, "metadata")
	r := &Result{Doc: index, Item: item, Kind: kind, Name: scalar(meta, "name"), Namespace: scalar(meta, "namespace")}
	object := kind + " " + r.Name
	if r.Namespace != "" {
		object = kind + " " + r.Namespace + "/" + r.Name
	}
	if item > 0 {
		object = fmt.Sprintf("item %d, %s", item, object)
	}
	fail := func(err error) (*Result, bool, error) {
		if r.Decision.Reason == "" {
			r.Decision.Reason = ReasonInvalidObject
			r.Decision.Message = strings.ReplaceAll(err.Error(), "\n", "; ")
		}
		return r, false, &DocError{Doc: index, Object: object, Err: err}
	}

	var tmpl *kyaml.Node
	path := "spec.template"
	switch {
	case kind == "Pod":
		tmpl, path = obj, ""
	case kind == "CronJob":
		tmpl, path = get(get(get(get(obj, "spec"), "jobTemplate"), "spec"), "template"), "spec.jobTemplate.spec.template"
	default:
		tmpl = get(get(obj, "spec"), "template")
		if get(get(tmpl, "spec"), "containers") == nil {
			tmpl = nil
		}
	}
	if tmpl == nil || tmpl.Kind != kyaml.MappingNode {
		if kind == "Pod" || kind == "CronJob" {
			return fail(fmt.Errorf("no pod template at %s", orRoot(path)))
		}
		return nil, false, nil
	}

	var pod corev1.Pod
	if err := decodeInto(tmpl, &pod); err != nil {
		return fail(fmt.Errorf("%s: %w", orRoot(path), err))
	}
	if pod.Namespace == "" {
		pod.Namespace = r.Namespace
	}
	if path != "" && pod.Name == "" {
		pod.Name = r.Name
	}
	var (
		out *corev1.Pod
		err error
	)
	var (
		keepEmpty []string
		restored  map[string]json.RawMessage
	)
	if opts.Uninject {
		st, injected, perr := inject.ParseStatus(&pod)
		if perr != nil {
			return fail(perr)
		}
		keepEmpty = st.EmptyFields
		if restored, perr = restoredNodes(st); perr != nil {
			return fail(perr)
		}
		out, err = inject.Uninject(&pod)
		r.Changed = injected
		r.Decision.Message = "not injected"
		if injected {
			r.Decision.Message = "uninjected"
		}
	} else {
		var dec inject.Decision
		out, dec, err = inject.Inject(&pod, inject.Namespace{Name: pod.Namespace, Labels: opts.NamespaceLabels}, opts.Config, opts.Inject)
		r.Decision = dec
		r.Changed = dec.Injected
	}
	if err != nil {
		return fail(err)
	}
	if !r.Changed {
		return r, false, nil
	}
	if !opts.Uninject {
		if err := recordManifest(tmpl, out); err != nil {
			return fail(err)
		}
	}
	if err := patchTemplate(tmpl, &pod, out, keepEmpty, restored); err != nil {
		return fail(err)
	}
	return r, true, nil
}

// emptyFieldPaths are the template fields injection may fill.
var emptyFieldPaths = []struct{ parent, key string }{
	{"", "metadata"}, {"metadata", "labels"}, {"metadata", "annotations"}, {"spec", "initContainers"}, {"spec", "containers"}, {"spec", "volumes"},
}

// recordManifest notes in the status annotation of pod what only the
// manifest knows: which of the template's fields were written as an
// explicit empty list or map, and the pod's own containers that injection
// merged over injected ones in the manifest's key order.
func recordManifest(tmpl *kyaml.Node, pod *corev1.Pod) error {
	var empty []string
	for _, f := range emptyFieldPaths {
		parent, path := tmpl, f.key
		if f.parent != "" {
			parent, path = get(tmpl, f.parent), f.parent+"."+f.key
		}
		switch v := get(parent, f.key); {
		case v == nil:
		case (v.Kind == kyaml.SequenceNode || v.Kind == kyaml.MappingNode) && len(v.Content) == 0:
			empty = append(empty, path)
		case v.Kind == kyaml.ScalarNode && v.ShortTag() == "!!null":
			empty = append(empty, path+"=null")
		}
	}
	st, ok, err := inject.ParseStatus(pod)
	if err != nil || !ok || (len(empty) == 0 && len(st.Overrides) == 0) {
		return err
	}
	st.EmptyFields = empty
	spec := get(tmpl, "spec")
	for i, o := range st.Overrides {
		key := "containers"
		if o.Init {
			key = "initContainers"
		}
		seq := get(spec, key)
		if seq == nil || seq.Kind != kyaml.SequenceNode || o.Index >= len(seq.Content) {
			return fmt.Errorf("spec.%s[%d]: the container injection merged is not in the manifest", key, o.Index)
		}
		v, err := toJSONValue(seq.Content[o.Index], &expansion{active: map[*kyaml.Node]bool{}})
		if err != nil {
			return fmt.Errorf("spec.%s[%d]: %w", key, o.Index, err)
		}
		if st.Overrides[i].Container, err = json.Marshal(v); err != nil {
			return fmt.Errorf("spec.%s[%d]: %w", key, o.Index, err)
		}
	}
	b, err := json.Marshal(st)
	if err != nil {
		return err
	}
	pod.Annotations[inject.AnnotationStatus] = string(b)
	return nil
}

// restoredNodes returns the containers Uninject puts back from the status,
// by list and name, as the manifest they came from had them.
func restoredNodes(st inject.Status) (map[string]json.RawMessage, error) {
	if len(st.Overrides) == 0 {
		return nil, nil
	}
	m := map[string]json.RawMessage{}
	for _, o := range st.Overrides {
		var c struct {
			Name string `json:"name"`
		}
		if err := json.Unmarshal(o.Container, &c); err != nil {
			return nil, fmt.Errorf("annotation %s: override %s is not a container: %w", inject.AnnotationStatus, o.Container, err)
		}
		key := "containers/"
		if o.Init {
			key = "initContainers/"
		}
		m[key+c.Name] = o.Container
	}
	return m, nil
}

func orRoot(path string) string {
	if path == "" {
		return "pod"
	}
	return path
}

// decodeInto converts a YAML node to JSON and decodes it into v.
func decodeInto(n *kyaml.Node, v any) error {
	var generic any
	if err := n.Decode(&generic); err != nil {
		return err
	}
	b, err := json.Marshal(jsonable(generic))
	if err != nil {
		return err
	}
	return json.Unmarshal(b, v)
}

// jsonable turns map[any]any (non-string keys) into map[string]any.
func jsonable(v any) any {
	switch v := v.(type) {
	case map[string]any:
		for k, e := range v {
			v[k] = jsonable(e)
		}
		return v
	case map[any]any:
		m := make(map[string]any, len(v))
		for k, e := range v {
			m[fmt.Sprint(k)] = jsonable(e)
		}
		return m
	case []any:
		for i, e := range v {
			v[i] = jsonable(e)
		}
		return v
	}
	return v
}
