package server

import (
	"fmt"
	"runtime"
	"sync"
	"unsafe"
	"weak"

	discoverygrpc "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/encoding"
	grpcproto "google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
)

// A state-of-the-world response of one type is the same message for every
// proxy of a shape but for its nonce: the version, the type and every
// resource (a thousand endpoint assignments, or a ~1 MB route
// configuration). gRPC's codec encoded it again for each stream: at 1000
// proxies an endpoint push was 1000 encodings of 1000 assignments.
// wireCodec, the xDS gRPC servers' codec, sends a typeResponse's message
// encoded once (fields 1, 2 and 4) followed by the stream's own nonce
// (field 5, the last field a response carries: the bytes are what the
// standard encoding of the whole message gives).
//
// The codec recognises such a message by its Resources slice, which is the
// typeResponse's own (shared, never written after the build):
// sharedWire maps the slice's address to the typeResponse weakly, and the
// entry goes when the typeResponse is collected. A message whose other
// fields differ from what the encoding holds (a callback changed it, a
// canary, control-plane or resource-error field is set), or whose typeResponse is gone, is
// encoded by the proto codec as before.
//
// A delta response differs per stream (its resources are what changed for
// that stream), but its large resources are the built's shared marshaled
// bytes: deltaWire writes the message around them and sends them as they
// are instead of copying each into a pooled buffer per stream.

// sharedWire maps the address of a typeResponse's anys to the typeResponse.
var sharedWire sync.Map // uintptr → weak.Pointer[typeResponse]

// typeWire is the encoded form of a typeResponse's message, made on first
// use.
type typeWire struct {
	once sync.Once
	body []byte
	err  error
}

// register makes tr's message known to wireCodec. While tr lives, its anys
// do, so no other slice has the address; an entry whose typeResponse was
// collected is skipped and removed (a newer entry at the same address, once
// the old slice was collected as well, is not).
func (tr *typeResponse) register() {
	if len(tr.anys) == 0 {
		return
	}
	key := uintptr(unsafe.Pointer(unsafe.SliceData(tr.anys)))
	wp := weak.Make(tr)
	sharedWire.Store(key, wp)
	runtime.AddCleanup(tr, func(key uintptr) { sharedWire.CompareAndDelete(key, wp) }, key)
}

// wire returns tr's message encoded without a nonce.
func (tr *typeResponse) wire() ([]byte, error) {
	tr.encoded.once.Do(func() {
		tr.encoded.body, tr.encoded.err = proto.MarshalOptions{Deterministic: true}.Marshal(
			&discoverygrpc.DiscoveryResponse{VersionInfo: tr.version, Resources: tr.anys, TypeUrl: tr.typeURL})
		if tr.encoded.err != nil {
			tr.encoded.err = fmt.Errorf("encoding the %s response version %s: %w", tr.typeURL, tr.version, tr.encoded.err)
		}
	})
	return tr.encoded.body, tr.encoded.err
}

// sharedTypeResponse returns the typeResponse whose encoding is r without
// its nonce, or nil.
func sharedTypeResponse(r *discoverygrpc.DiscoveryResponse) *typeResponse {
	if len(r.Resources) == 0 {
		return nil
	}
	v, ok := sharedWire.Load(uintptr(unsafe.Pointer(unsafe.SliceData(r.Resources))))
	if !ok {
		return nil
	}
	tr := v.(weak.Pointer[typeResponse]).Value()
	if tr == nil || len(tr.anys) != len(r.Resources) || tr.version != r.VersionInfo || tr.typeURL != r.TypeUrl ||
		r.Canary || r.ControlPlane != nil || len(r.ResourceErrors) != 0 || len(r.ProtoReflect().GetUnknown()) != 0 {
		return nil
	}
	return tr
}

// wireCodec is gRPC's proto codec but for shared SotW responses.
type wireCodec struct{ proto encoding.CodecV2 }

func newWireCodec() wireCodec { return wireCodec{proto: encoding.GetCodecV2(grpcproto.Name)} }

// Marshal implements encoding.CodecV2.
func (c wireCodec) Marshal(v any) (mem.BufferSlice, error) {
	if r, ok := v.(*discoverygrpc.DiscoveryResponse); ok {
		if tr := sharedTypeResponse(r); tr != nil {
			body, err := tr.wire()
			if err != nil {
				return nil, err
			}
			var nonce []byte
			if r.Nonce != "" {
				nonce = protowire.AppendString(protowire.AppendTag(make([]byte, 0, len(r.Nonce)+2), 5, protowire.BytesType), r.Nonce)
			}
			// SliceBuffers are not pooled: gRPC's Free of them is a no-op
			// and it only reads them.
			return mem.BufferSlice{mem.SliceBuffer(body), mem.SliceBuffer(nonce)}, nil
		}
	}
	if r, ok := v.(*discoverygrpc.DeltaDiscoveryResponse); ok {
		if out, ok := deltaWire(r); ok {
			return out, nil
		}
	}
	return c.proto.Marshal(v)
}

// sharedDeltaWire maps the address of a typeResponse's all (every
// resource of the type as a delta response lists them) to the
// typeResponse, as sharedWire does for SotW.
var sharedDeltaWire sync.Map // uintptr → weak.Pointer[typeResponse]

// allDelta returns every resource of tr as a delta response lists them,
// the same slice each time, known to wireCodec (under sharedCache.mu).
func (tr *typeResponse) allDelta() []*discoverygrpc.Resource {
	if tr.all != nil || len(tr.sorted) == 0 {
		return tr.all
	}
	all := make([]*discoverygrpc.Resource, len(tr.sorted))
	for i, name := range tr.sorted {
		r := tr.resources[name]
		all[i] = &discoverygrpc.Resource{Name: name, Version: r.version, Resource: r.any}
	}
	tr.all = all
	key := uintptr(unsafe.Pointer(unsafe.SliceData(all)))
	wp := weak.Make(tr)
	sharedDeltaWire.Store(key, wp)
	runtime.AddCleanup(tr, func(key uintptr) { sharedDeltaWire.CompareAndDelete(key, wp) }, key)
	return all
}

// allWire returns the encoding of tr's all as field 2 of a delta
// response.
func (tr *typeResponse) allWire() ([]byte, error) {
	tr.allEncoded.once.Do(func() {
		var b []byte
		for _, res := range tr.all {
			m, err := proto.MarshalOptions{Deterministic: true}.Marshal(res)
			if err != nil {
				tr.allEncoded.err = fmt.Errorf("encoding the %s delta resource %q: %w", tr.typeURL, res.Name, err)
				return
			}
			b = protowire.AppendBytes(protowire.AppendTag(b, 2, protowire.BytesType), m)
		}
		tr.allEncoded.body = b
	})
	return tr.allEncoded.body, tr.allEncoded.err
}

// sharedDeltaAll returns the typeResponse whose all r's resources are,
// or nil.
func sharedDeltaAll(r *discoverygrpc.DeltaDiscoveryResponse) *typeResponse {
	if len(r.Resources) == 0 {
		return nil
	}
	v, ok := sharedDeltaWire.Load(uintptr(unsafe.Pointer(unsafe.SliceData(r.Resources))))
	if !ok {
		return nil
	}
	tr := v.(weak.Pointer[typeResponse]).Value()
	if tr == nil || len(tr.all) != len(r.Resources) {
		return nil
	}
	return tr
}

// sharedValueMin is the size from which deltaWire sends a resource's
// marshaled bytes as they are instead of copying them.
const sharedValueMin = 4 << 10

// deltaWire encodes a delta response with every large resource's bytes
// referenced, not copied: a delta response carries the built's shared
// marshaled resources (a ~1 MB route configuration for every proxy on a
// route change), which the proto codec copied into a pooled buffer per
// stream. The bytes are the proto encoding's (fields in number order).
// It declines (false) a response with fields it does not write.
func deltaWire(r *discoverygrpc.DeltaDiscoveryResponse) (mem.BufferSlice, bool) {
	if r.ControlPlane != nil || len(r.RemovedResourceNames) != 0 || len(r.ResourceErrors) != 0 || len(r.ProtoReflect().GetUnknown()) != 0 {
		return nil, false
	}
	var out mem.BufferSlice
	var buf []byte
	str := func(num protowire.Number, v string) {
		if v != "" {
			buf = protowire.AppendString(protowire.AppendTag(buf, num, protowire.BytesType), v)
		}
	}
	if tr := sharedDeltaAll(r); tr != nil {
		// Every resource of the type, encoded once for every stream.
		body, err := tr.allWire()
		if err != nil {
			return nil, false
		}
		str(1, r.SystemVersionInfo)
		out = append(out, mem.SliceBuffer(buf), mem.SliceBuffer(body))
		buf = nil
		str(4, r.TypeUrl)
		str(5, r.Nonce)
		for _, name := range r.RemovedResources {
			buf = protowire.AppendString(protowire.AppendTag(buf, 6, protowire.BytesType), name)
		}
		return append(out, mem.SliceBuffer(buf)), true
	}
	large := false
	for _, res := range r.Resources {
		if res == nil || res.ResourceName != nil || len(res.Aliases) != 0 || res.Ttl != nil || res.CacheControl != nil ||
			res.Metadata != nil || len(res.ProtoReflect().GetUnknown()) != 0 ||
			(res.Resource != nil && len(res.Resource.ProtoReflect().GetUnknown()) != 0) {
			return nil, false
		}
		if len(res.Resource.GetValue()) >= sharedValueMin {
			large = true
		}
	}
	if !large {
		return nil, false // the proto codec's one buffer is as good
	}
	str(1, r.SystemVersionInfo)
	for _, res := range r.Resources {
		a := res.Resource
		anyLen := 0
		if a != nil {
			if a.TypeUrl != "" {
				anyLen += protowire.SizeTag(1) + protowire.SizeBytes(len(a.TypeUrl))
			}
			if len(a.Value) != 0 {
				anyLen += protowire.SizeTag(2) + protowire.SizeBytes(len(a.Value))
			}
		}
		resLen := 0
		if res.Version != "" {
			resLen += protowire.SizeTag(1) + protowire.SizeBytes(len(res.Version))
		}
		if a != nil {
			resLen += protowire.SizeTag(2) + protowire.SizeBytes(anyLen)
		}
		if res.Name != "" {
			resLen += protowire.SizeTag(3) + protowire.SizeBytes(len(res.Name))
		}
		buf = protowire.AppendVarint(protowire.AppendTag(buf, 2, protowire.BytesType), uint64(resLen))
		str(1, res.Version)
		if a != nil {
			buf = protowire.AppendVarint(protowire.AppendTag(buf, 2, protowire.BytesType), uint64(anyLen))
			str(1, a.TypeUrl)
			if len(a.Value) != 0 {
				buf = protowire.AppendVarint(protowire.AppendTag(buf, 2, protowire.BytesType), uint64(len(a.Value)))
				if len(a.Value) >= sharedValueMin {
					// gRPC only reads it (a SliceBuffer's Free is a no-op).
					out = append(out, mem.SliceBuffer(buf), mem.SliceBuffer(a.Value))
					buf = nil
				} else {
					buf = append(buf, a.Value...)
				}
			}
		}
		str(3, res.Name)
	}
	str(4, r.TypeUrl)
	str(5, r.Nonce)
	for _, name := range r.RemovedResources {
		buf = protowire.AppendString(protowire.AppendTag(buf, 6, protowire.BytesType), name)
	}
	if len(buf) != 0 {
		out = append(out, mem.SliceBuffer(buf))
	}
	return out, true
}

// Unmarshal implements encoding.CodecV2.
func (c wireCodec) Unmarshal(data mem.BufferSlice, v any) error { return c.proto.Unmarshal(data, v) }

// Name implements encoding.CodecV2: the content subtype stays proto.
func (c wireCodec) Name() string { return grpcproto.Name }
