package manifest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	kyaml "sigs.k8s.io/kustomize/kyaml/yaml"
)

// get returns the value of key in mapping m, or nil.
func get(m *kyaml.Node, key string) *kyaml.Node {
	if m == nil {
		return nil
	}
	if m.Kind == kyaml.AliasNode {
		m = m.Alias
	}
	if m == nil || m.Kind != kyaml.MappingNode {
		return nil
	}
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			v := m.Content[i+1]
			if v.Kind == kyaml.AliasNode && v.Alias != nil {
				return v.Alias
			}
			return v
		}
	}
	return nil
}

// toBlock turns the empty flow collection n ([] or {}) at key of m into a
// block collection. A block collection has no line of its own, so its line
// comment moves to the key ("volumes: # comment").
func toBlock(m *kyaml.Node, key string, n *kyaml.Node) {
	n.Style &^= kyaml.FlowStyle
	if k := keyNode(m, key); k != nil && n.LineComment != "" && k.LineComment == "" {
		k.LineComment, n.LineComment = n.LineComment, ""
	}
}

// toEmptyFlow is the inverse of toBlock for a collection emptied again.
func toEmptyFlow(m *kyaml.Node, key string, n *kyaml.Node) {
	n.Style |= kyaml.FlowStyle
	if k := keyNode(m, key); k != nil && k.LineComment != "" && n.LineComment == "" {
		n.LineComment, k.LineComment = k.LineComment, ""
	}
}

// emptyMode tells how the field at path was empty in the original
// manifest: "empty" ([] or {}), "null", or "" (absent).
func emptyMode(keep []string, path string) string {
	for _, k := range keep {
		if k == path {
			return "empty"
		}
		if k == path+"=null" {
			return "null"
		}
	}
	return ""
}

func nullNode() *kyaml.Node { return &kyaml.Node{Kind: kyaml.ScalarNode, Tag: "!!null"} }

// keyNode returns the key node of key in mapping m, or nil.
func keyNode(m *kyaml.Node, key string) *kyaml.Node {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			return m.Content[i]
		}
	}
	return nil
}

func scalar(m *kyaml.Node, key string) string {
	if v := get(m, key); v != nil && v.Kind == kyaml.ScalarNode {
		return v.Value
	}
	return ""
}

func strNode(s string) *kyaml.Node {
	return &kyaml.Node{Kind: kyaml.ScalarNode, Tag: "!!str", Value: s}
}

// set sets key in mapping m to v, inserting a new key before the key named
// before (or at the end).
func set(m *kyaml.Node, key string, v *kyaml.Node, before string) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			m.Content[i+1] = v
			return
		}
	}
	at := len(m.Content)
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == before {
			at = i
			break
		}
	}
	if m.Style == kyaml.FlowStyle && len(m.Content) == 0 {
		m.Style = 0 // an empty {} becomes a block mapping
	}
	m.Content = slices.Insert(m.Content, at, strNode(key), v)
}

func del(m *kyaml.Node, key string) {
	for i := 0; i+1 < len(m.Content); i += 2 {
		if m.Content[i].Value == key {
			m.Content = slices.Delete(m.Content, i, i+2)
			return
		}
	}
}

// ensureMap returns the mapping at key in m, creating it (before the key
// named before) if absent.
func ensureMap(m *kyaml.Node, key, before string) *kyaml.Node {
	if v := get(m, key); v != nil && v.Kind == kyaml.MappingNode {
		return v
	}
	v := &kyaml.Node{Kind: kyaml.MappingNode, Tag: "!!map"}
	set(m, key, v, before)
	return v
}

// patchTemplate writes the difference between before and after (the typed
// pod of the template node t) into t: labels, annotations, the service
// account name, init containers, containers and volumes. Everything else in t is left alone.
//
// keepEmpty lists fields to keep rather than remove when they become empty:
// "spec.volumes" as an empty flow collection ([] or {}), "spec.volumes=null"
// as a null. restored holds, by "initContainers/NAME" or "containers/NAME",
// the JSON of containers to write exactly so, in this key order (the pod's
// own containers uninject puts back, as the manifest had them).
func patchTemplate(t *kyaml.Node, before, after *corev1.Pod, keepEmpty []string, restored map[string]json.RawMessage) error {
	// Labels and annotations.
	for _, f := range []struct {
		key           string
		before, after map[string]string
	}{{"labels", before.Labels, after.Labels}, {"annotations", before.Annotations, after.Annotations}} {
		if maps.Equal(f.before, f.after) {
			continue
		}
		meta := ensureMap(t, "metadata", "spec")
		if meta.Style == kyaml.FlowStyle && len(meta.Content) == 0 {
			toBlock(t, "metadata", meta)
		}
		m := ensureMap(meta, f.key, "")
		if m.Style == kyaml.FlowStyle && len(m.Content) == 0 {
			toBlock(meta, f.key, m)
		}
		keys := slices.Sorted(maps.Keys(f.after))
		for _, k := range keys {
			if old, ok := f.before[k]; !ok || old != f.after[k] {
				set(m, k, strNode(f.after[k]), "")
			}
		}
		for k := range f.before {
			if _, ok := f.after[k]; !ok {
				del(m, k)
			}
		}
		if len(m.Content) == 0 {
			switch emptyMode(keepEmpty, "metadata."+f.key) {
			case "empty":
				toEmptyFlow(meta, f.key, m)
			case "null":
				set(meta, f.key, nullNode(), "")
			default:
				del(meta, f.key)
			}
		}
		if len(meta.Content) == 0 {
			switch emptyMode(keepEmpty, "metadata") {
			case "empty":
				toEmptyFlow(t, "metadata", meta)
			case "null":
				set(t, "metadata", nullNode(), "")
			default:
				del(t, "metadata")
			}
		}
	}
	spec := get(t, "spec")
	if spec == nil || spec.Kind != kyaml.MappingNode {
		return fmt.Errorf("spec is not a mapping")
	}
	if b, a := before.Spec.ServiceAccountName, after.Spec.ServiceAccountName; b != a {
		if a == "" {
			del(spec, "serviceAccountName")
		} else {
			set(spec, "serviceAccountName", strNode(a), "")
		}
	}
	lists := []listPatch{
		containerList("initContainers", "containers", before.Spec.InitContainers, after.Spec.InitContainers),
		containerList("containers", "", before.Spec.Containers, after.Spec.Containers),
		{key: "volumes", oldNames: volumeNames(before.Spec.Volumes), newNames: volumeNames(after.Spec.Volumes),
			oldValue: func(i int) any { return before.Spec.Volumes[i] }, newValue: func(i int) any { return after.Spec.Volumes[i] }},
	}
	for _, l := range lists {
		l.keepEmpty = emptyMode(keepEmpty, "spec."+l.key)
		l.restored = restored
		if err := l.apply(spec); err != nil {
			return err
		}
	}
	return nil
}

func containerList(key, before string, old, cur []corev1.Container) listPatch {
	return listPatch{key: key, before: before, oldNames: containerNames(old), newNames: containerNames(cur),
		oldValue: func(i int) any { return old[i] }, newValue: func(i int) any { return cur[i] }}
}

func containerNames(cs []corev1.Container) []string {
	n := make([]string, len(cs))
	for i, c := range cs {
		n[i] = c.Name
	}
	return n
}

func volumeNames(vs []corev1.Volume) []string {
	n := make([]string, len(vs))
	for i, v := range vs {
		n[i] = v.Name
	}
	return n
}

// listPatch rewrites the sequence at key of the pod spec from the typed
// items before and after.
type listPatch struct {
	key, before        string // before: the key a new sequence is inserted before
	keepEmpty          string
	oldNames, newNames []string
	oldValue, newValue func(int) any
	restored           map[string]json.RawMessage
}

// apply rebuilds the sequence so it lists the items named newNames: an
// item also named in oldNames keeps its original node (comments, order of
// fields), patched where its typed value changed; new items are rendered
// from the typed value (or taken from restored).
func (l *listPatch) apply(spec *kyaml.Node) error {
	seq := get(spec, l.key)
	if seq != nil && seq.Kind != kyaml.SequenceNode {
		seq = nil
	}
	type old struct {
		node  *kyaml.Node
		index int
	}
	same := slices.Equal(l.oldNames, l.newNames)
	existing := map[string]old{}
	if seq != nil {
		for _, el := range seq.Content {
			name := scalar(el, "name")
			if i := slices.Index(l.oldNames, name); i >= 0 {
				if _, dup := existing[name]; !dup {
					existing[name] = old{el, i}
				}
			}
		}
	}
	byIndex := same && seq != nil && len(seq.Content) == len(l.oldNames)
	changed := !same
	content := make([]*kyaml.Node, 0, len(l.newNames))
	for i, name := range l.newNames {
		el, ok := existing[name]
		if byIndex {
			el, ok = old{seq.Content[i], i}, true
		}
		if ok {
			delete(existing, name)
			was, now := l.oldValue(el.index), l.newValue(i)
			var exact any
			if raw, ok := l.restored[l.key+"/"+name]; ok {
				if err := json.Unmarshal(raw, &exact); err != nil {
					return fmt.Errorf("%s %s: %w", l.key, name, err)
				}
			}
			if !apiequality.Semantic.DeepEqual(was, now) || exact != nil {
				changed = true
				if err := patchValue(el.node, was, now, exact); err != nil {
					return fmt.Errorf("%s %s: %w", l.key, name, err)
				}
			}
			content = append(content, el.node)
			continue
		}
		changed = true
		if raw, ok := l.restored[l.key+"/"+name]; ok {
			n, err := parseYAML(string(raw))
			if err != nil || n == nil {
				return fmt.Errorf("%s %s: recorded container %s: %v", l.key, name, raw, err) //nolint:errorlint // err is nil when the document is empty: shown, not wrapped
			}
			blockStyle(n.Content[0])
			content = append(content, n.Content[0])
			continue
		}
		n, err := toNode(l.newValue(i))
		if err != nil {
			return err
		}
		content = append(content, n)
	}
	if !changed {
		return nil
	}
	if len(content) == 0 {
		switch {
		case l.keepEmpty == "empty" && seq != nil:
			seq.Content = nil
			toEmptyFlow(spec, l.key, seq)
		case l.keepEmpty == "null":
			set(spec, l.key, nullNode(), "")
		default:
			del(spec, l.key)
		}
		return nil
	}
	if seq == nil {
		seq = &kyaml.Node{Kind: kyaml.SequenceNode, Tag: "!!seq"}
		set(spec, l.key, seq, l.before)
	}
	if seq.Style == kyaml.FlowStyle {
		toBlock(spec, l.key, seq)
	}
	seq.Content = content
	return nil
}

// patchValue rewrites node n, which holds the typed value was, so it holds
// now, touching only what differs: keys of a mapping are added (at the
// end), removed or patched in place; items of a sequence are matched by
// value, then by their name, mountPath or containerPort, and reused.
//
// exact, when not nil, is the generic JSON to write instead of now (which it
// must equal as typed data): it holds only the fields a manifest had.
func patchValue(n *kyaml.Node, was, now, exact any) error {
	var a, b any
	if err := roundTrip(was, &a); err != nil {
		return err
	}
	if exact != nil {
		return patchGeneric(n, a, exact)
	}
	if err := roundTrip(now, &b); err != nil {
		return err
	}
	return patchGeneric(n, a, b)
}

func roundTrip(v any, out *any) error {
	j, err := json.Marshal(v)
	if err != nil {
		return err
	}
	return json.Unmarshal(j, out)
}

func patchGeneric(n *kyaml.Node, was, now any) error {
	if reflect.DeepEqual(was, now) {
		return nil
	}
	switch now := now.(type) {
	case map[string]any:
		old, ok := was.(map[string]any)
		if ok && n.Kind == kyaml.MappingNode {
			for _, k := range slices.Sorted(maps.Keys(old)) {
				if _, keep := now[k]; !keep {
					del(n, k)
				}
			}
			for _, k := range slices.Sorted(maps.Keys(now)) {
				if o, had := old[k]; had && reflect.DeepEqual(o, now[k]) {
					continue // unchanged (or only in the typed form, as resources: {})
				}
				if child := get(n, k); child != nil {
					if _, had := old[k]; had {
						if err := patchGeneric(child, old[k], now[k]); err != nil {
							return err
						}
						continue
					}
				}
				v, err := toNode(now[k])
				if err != nil {
					return err
				}
				set(n, k, v, "")
			}
			if n.Style&kyaml.FlowStyle != 0 && len(n.Content) > 0 {
				n.Style &^= kyaml.FlowStyle
			}
			return nil
		}
	case []any:
		old, ok := was.([]any)
		if ok && n.Kind == kyaml.SequenceNode && len(old) == len(n.Content) {
			used := make([]bool, len(old))
			find := func(match func(any) bool) int {
				for j, o := range old {
					if !used[j] && match(o) {
						return j
					}
				}
				return -1
			}
			content := make([]*kyaml.Node, 0, len(now))
			for _, item := range now {
				j := find(func(o any) bool { return reflect.DeepEqual(o, item) })
				if j < 0 {
					if id := identity(item); id != "" {
						j = find(func(o any) bool { return identity(o) == id })
					}
				}
				if j >= 0 {
					used[j] = true
					if err := patchGeneric(n.Content[j], old[j], item); err != nil {
						return err
					}
					content = append(content, n.Content[j])
					continue
				}
				v, err := toNode(item)
				if err != nil {
					return err
				}
				content = append(content, v)
			}
			n.Content = content
			if n.Style&kyaml.FlowStyle != 0 && len(content) > 0 {
				n.Style &^= kyaml.FlowStyle
			}
			return nil
		}
	}
	v, err := toNode(now)
	if err != nil {
		return err
	}
	v.HeadComment, v.LineComment, v.FootComment = n.HeadComment, n.LineComment, n.FootComment
	*n = *v
	return nil
}

// identity is the merge key of a list item of a container: env and volume
// mounts by name or mountPath, ports by containerPort.
func identity(v any) string {
	m, ok := v.(map[string]any)
	if !ok {
		return ""
	}
	for _, k := range []string{"name", "mountPath", "containerPort"} {
		if id, ok := m[k]; ok {
			return fmt.Sprint(k, "=", id)
		}
	}
	return ""
}

// toNode renders a typed value as a block-style YAML node.
func toNode(v any) (*kyaml.Node, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	n, err := parseYAML(string(b))
	if err != nil {
		return nil, err
	}
	root := n.Content[0]
	blockStyle(root)
	switch v.(type) {
	case corev1.Container:
		orderKeys(root, containerKeyOrder)
	case map[string]any, []any:
		nameFirst(root)
	}
	return root, nil
}

// containerKeyOrder is the order a person writes a container in (the
// struct order of corev1.Container puts imagePullPolicy and securityContext
// last).
var containerKeyOrder = []string{"name", "image", "imagePullPolicy", "command", "args", "ports", "env",
	"resources", "volumeMounts", "restartPolicy", "startupProbe", "readinessProbe", "livenessProbe", "lifecycle"}

// nameFirst puts the key "name" first in every mapping under n (generic
// values are rendered in sorted key order).
func nameFirst(n *kyaml.Node) {
	if n.Kind == kyaml.MappingNode {
		orderKeys(n, []string{"name"})
	}
	for _, c := range n.Content {
		nameFirst(c)
	}
}

// orderKeys moves the keys listed in order to the front of mapping m, in
// that order; other keys follow in their original order.
func orderKeys(m *kyaml.Node, order []string) {
	rank := func(k string) int {
		for i, o := range order {
			if o == k {
				return i
			}
		}
		return len(order)
	}
	type pair struct{ k, v *kyaml.Node }
	pairs := make([]pair, 0, len(m.Content)/2)
	for i := 0; i+1 < len(m.Content); i += 2 {
		pairs = append(pairs, pair{m.Content[i], m.Content[i+1]})
	}
	slices.SortStableFunc(pairs, func(a, b pair) int { return rank(a.k.Value) - rank(b.k.Value) })
	for i, p := range pairs {
		m.Content[2*i], m.Content[2*i+1] = p.k, p.v
	}
}

// blockStyle clears flow and JSON quoting styles, so the encoder writes
// block YAML and quotes only where needed.
func blockStyle(n *kyaml.Node) {
	if n.Kind == kyaml.ScalarNode {
		if n.Style == kyaml.DoubleQuotedStyle || n.Style == kyaml.SingleQuotedStyle {
			n.Style = 0
		}
	} else {
		n.Style &^= kyaml.FlowStyle
	}
	for _, c := range n.Content {
		blockStyle(c)
	}
}

// render writes the output stream.
func render(docs []doc, format Format) ([]byte, error) {
	var buf bytes.Buffer
	if format == FormatJSON {
		first := true
		for _, d := range docs {
			if d.node == nil {
				continue
			}
			if !first {
				buf.WriteByte('\n')
			}
			first = false
			v, err := toJSONValue(d.node.Content[0], &expansion{active: map[*kyaml.Node]bool{}})
			if err != nil {
				return nil, err
			}
			b, err := json.MarshalIndent(v, "", "  ")
			if err != nil {
				return nil, err
			}
			buf.Write(b)
			buf.WriteByte('\n')
		}
		return buf.Bytes(), nil
	}
	for i, d := range docs {
		sep := d.sep
		if d.json && i > 0 {
			sep = "---\n"
		}
		if !d.changed {
			if d.json && i > 0 {
				buf.WriteString(sep)
			} else {
				buf.WriteString(d.sep)
			}
			buf.WriteString(d.raw)
			if d.json && !strings.HasSuffix(d.raw, "\n") {
				buf.WriteByte('\n')
			}
			continue
		}
		buf.WriteString(sep)
		if d.json {
			blockStyle(d.node)
		}
		style := kyaml.DeriveSeqIndentStyle(d.raw)
		fixFlowNulls(d.node, false)
		var db bytes.Buffer
		enc := kyaml.NewEncoderWithOptions(&db, &kyaml.EncoderOptions{SeqIndent: kyaml.SequenceIndentStyle(style)})
		if !d.json {
			enc.SetIndent(detectIndent(d.raw))
		}
		if err := enc.Encode(d.node); err != nil {
			return nil, err
		}
		if err := enc.Close(); err != nil {
			return nil, err
		}
		if d.json {
			buf.Write(db.Bytes())
			continue
		}
		restored := restoreText(d.raw, db.String())
		if !sameYAML(restored, db.String()) {
			// The restoration must never change the meaning; if it
			// would, the encoder's text is used as it is.
			restored = db.String()
		}
		buf.WriteString(restored)
	}
	return buf.Bytes(), nil
}

// orderedMap marshals to a JSON object keeping key order.
type orderedMap struct {
	keys []string
	vals []any
}

func (m orderedMap) MarshalJSON() ([]byte, error) {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range m.keys {
		if i > 0 {
			b.WriteByte(',')
		}
		kb, _ := json.Marshal(k)
		b.Write(kb)
		b.WriteByte(':')
		vb, err := json.Marshal(m.vals[i])
		if err != nil {
			return nil, err
		}
		b.Write(vb)
	}
	b.WriteByte('}')
	return b.Bytes(), nil
}

// expansion guards alias expansion against cycles and "billion laughs".
type expansion struct {
	active map[*kyaml.Node]bool
	nodes  int
}

// maxJSONNodes bounds the size of a document's JSON form.
const maxJSONNodes = 1 << 20

// toJSONValue converts a YAML node to a value json.Marshal writes in the
// node's key order.
func toJSONValue(n *kyaml.Node, x *expansion) (any, error) {
	if x.nodes++; x.nodes > maxJSONNodes {
		return nil, fmt.Errorf("document expands to more than %d values (aliases)", maxJSONNodes)
	}
	switch n.Kind {
	case kyaml.AliasNode:
		if n.Alias == nil || x.active[n.Alias] {
			return nil, fmt.Errorf("recursive alias *%s", n.Value)
		}
		x.active[n.Alias] = true
		defer delete(x.active, n.Alias)
		return toJSONValue(n.Alias, x)
	case kyaml.MappingNode:
		m := orderedMap{}
		seen := map[string]int{}
		for i := 0; i+1 < len(n.Content); i += 2 {
			k := n.Content[i].Value
			v, err := toJSONValue(n.Content[i+1], x)
			if err != nil {
				return nil, err
			}
			if j, dup := seen[k]; dup {
				m.vals[j] = v
				continue
			}
			seen[k] = len(m.keys)
			m.keys = append(m.keys, k)
			m.vals = append(m.vals, v)
		}
		return m, nil
	case kyaml.SequenceNode:
		out := make([]any, 0, len(n.Content))
		for _, c := range n.Content {
			v, err := toJSONValue(c, x)
			if err != nil {
				return nil, err
			}
			out = append(out, v)
		}
		return out, nil
	case kyaml.ScalarNode:
		switch n.ShortTag() {
		case "!!str", "!!timestamp", "!!binary":
			return n.Value, nil
		case "!!null":
			return nil, nil
		}
		var v any
		if err := n.Decode(&v); err != nil {
			return nil, err
		}
		return v, nil
	case kyaml.DocumentNode:
		if len(n.Content) == 0 {
			return nil, nil
		}
		return toJSONValue(n.Content[0], x)
	}
	return nil, fmt.Errorf("unsupported YAML node kind %v", n.Kind)
}

// detectIndent returns the mapping indentation of a YAML text: the step from
// a "key:" line to the first nested key line (2 when unknown or outside the
// encoder's range 2-9).
func detectIndent(text string) int {
	prevIndent, prevOpens := -1, false
	for _, l := range strings.Split(text, "\n") {
		t := strings.TrimSpace(l)
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		ind := len(l) - len(strings.TrimLeft(l, " "))
		if prevOpens && ind > prevIndent && !strings.HasPrefix(t, "- ") && t != "-" {
			if step := ind - prevIndent; step >= 2 && step <= 9 {
				return step
			}
			return 2
		}
		body := t
		if i := strings.Index(body, " #"); i >= 0 {
			body = strings.TrimSpace(body[:i])
		}
		prevIndent, prevOpens = ind, strings.HasSuffix(body, ":") && !strings.HasPrefix(body, "- ")
	}
	return 2
}

// sameYAML reports whether two YAML texts hold the same data, in the same
// key order, with the same comments.
func sameYAML(a, b string) bool {
	na, errA := parseYAML(a)
	nb, errB := parseYAML(b)
	if errA != nil || errB != nil || na == nil || nb == nil {
		return false
	}
	return sameNode(na, nb)
}

func sameNode(a, b *kyaml.Node) bool {
	if a.Kind != b.Kind || a.Value != b.Value || a.ShortTag() != b.ShortTag() || len(a.Content) != len(b.Content) ||
		strings.TrimSpace(a.HeadComment) != strings.TrimSpace(b.HeadComment) ||
		strings.TrimSpace(a.LineComment) != strings.TrimSpace(b.LineComment) ||
		strings.TrimSpace(a.FootComment) != strings.TrimSpace(b.FootComment) {
		return false
	}
	if a.Kind == kyaml.AliasNode {
		return a.Value == b.Value
	}
	for i := range a.Content {
		if !sameNode(a.Content[i], b.Content[i]) {
			return false
		}
	}
	return true
}

// fixFlowNulls spells implicit nulls inside flow collections ({a}, [a, ])
// as null: the encoder would write them as an empty quoted string.
func fixFlowNulls(n *kyaml.Node, inFlow bool) {
	if n.Kind == kyaml.ScalarNode && inFlow && n.Value == "" && n.ShortTag() == "!!null" {
		n.Value = "null"
	}
	flow := inFlow || n.Style&kyaml.FlowStyle != 0
	for i, c := range n.Content {
		if n.Kind == kyaml.MappingNode && i%2 == 0 {
			continue // keys stay as written
		}
		fixFlowNulls(c, flow)
	}
}
