package upstream

import (
	"github.com/meshlet/meshlet/proxy/l7/grpcwire"

	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net/http"
	"time"

	"google.golang.org/protobuf/encoding/protowire"
)

// grpc.health.v1 serving status values (HealthCheckResponse.ServingStatus).
const grpcHealthServing = 1

// grpcHealthCheck asks base's (scheme://addr) grpc.health.v1.Health/Check
// for service over rt (the cluster's HTTP/2 transport) and returns nil when the answer is
// SERVING. The messages are encoded by hand (one string field in, one enum
// field out) so the proxy needs no gRPC runtime.
func grpcHealthCheck(ctx context.Context, rt http.RoundTripper, base, service string, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var msg []byte
	if service != "" {
		msg = protowire.AppendTag(msg, 1, protowire.BytesType)
		msg = protowire.AppendString(msg, service)
	}
	frame := make([]byte, 5, 5+len(msg))
	binary.BigEndian.PutUint32(frame[1:], uint32(len(msg)))
	frame = append(frame, msg...)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, base+"/grpc.health.v1.Health/Check", bytes.NewReader(frame))
	if err != nil {
		return err
	}
	req.Header.Set("Content-Type", "application/grpc")
	req.Header.Set("Te", "trailers")
	req.Header.Set("User-Agent", "meshlet-health-check")
	req.Header.Set("Grpc-Timeout", grpcwire.FormatTimeout(timeout))
	resp, err := rt.RoundTrip(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("HTTP status %d", resp.StatusCode)
	}
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return err
	}
	if gs := grpcwire.Status(resp.Header); gs != "" && gs != "0" { // trailers-only
		return fmt.Errorf("grpc-status %s: %s", gs, resp.Header.Get("Grpc-Message"))
	}
	if gs := resp.Trailer.Get("Grpc-Status"); gs != "0" {
		return fmt.Errorf("grpc-status %q: %s", gs, resp.Trailer.Get("Grpc-Message"))
	}
	if len(body) < 5 || body[0] != 0 || int(binary.BigEndian.Uint32(body[1:5])) != len(body)-5 {
		return errors.New("malformed grpc response message")
	}
	status, err := healthStatus(body[5:])
	if err != nil {
		return err
	}
	if status != grpcHealthServing {
		return fmt.Errorf("serving status %d, not SERVING", status)
	}
	return nil
}

// healthStatus decodes HealthCheckResponse.status (field 1, enum; absent
// means 0, UNKNOWN).
func healthStatus(b []byte) (uint64, error) {
	var status uint64
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return 0, protowire.ParseError(n)
		}
		b = b[n:]
		if num == 1 && typ == protowire.VarintType {
			v, n := protowire.ConsumeVarint(b)
			if n < 0 {
				return 0, protowire.ParseError(n)
			}
			status, b = v, b[n:]
			continue
		}
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			return 0, protowire.ParseError(n)
		}
		b = b[n:]
	}
	return status, nil
}
