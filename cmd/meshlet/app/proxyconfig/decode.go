package proxyconfig

import (
	"encoding/json"
	"fmt"
	"io"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/timestamppb"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

type protoreflectMessage = protoreflect.Message

// unmarshalAny decodes one element of "configs": an Any in JSON form
// ({"@type": ..., fields...}) into m of that type.
func unmarshalAny(opts protojson.UnmarshalOptions, b []byte, m interface{ ProtoReflect() protoreflect.Message }) error {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(b, &fields); err != nil {
		return err
	}
	delete(fields, "@type")
	rest, err := json.Marshal(fields)
	if err != nil {
		return err
	}
	return opts.Unmarshal(rest, m.ProtoReflect().Interface())
}

func metav1GetOptions() metav1.GetOptions { return metav1.GetOptions{} }

func ts(t *timestamppb.Timestamp) string {
	if t == nil {
		return "-"
	}
	return t.AsTime().UTC().Format(time.RFC3339)
}

// printJSON writes the dump's part for kind as Envoy prints it.
func printJSON(w io.Writer, d *Dump, kind string) error {
	var m proto.Message
	switch kind {
	case "clusters":
		m = d.Clusters
	case "listeners":
		m = d.Listeners
	case "routes":
		m = d.Routes
	case "endpoints":
		m = d.Endpoints
	}
	if m == nil || !m.ProtoReflect().IsValid() {
		return fmt.Errorf("the config dump has no %s", kind)
	}
	b, err := protojson.MarshalOptions{UseProtoNames: true, Indent: "  "}.Marshal(m)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}
