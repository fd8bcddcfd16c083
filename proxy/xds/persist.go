package xds

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/encoding/protodelim"
)

// The persisted state is a header line, "meshlet-xds-state v1 UNIXNANO",
// followed by one length-delimited DeltaDiscoveryResponse per type (its
// system_version_info the type's accepted version, every resource with
// its name and version). It is written to a temporary file and renamed
// over the old one, so a reader never sees half of it.
const stateMagic = "meshlet-xds-state v1"

func (c *Client) queuePersist() {
	if c.o.StateFile == "" {
		return
	}
	select {
	case c.persist <- struct{}{}:
	default: // one is pending; it writes the newest state
	}
}

// persistLoop writes the accepted state whenever it changed, until ctx
// ends; then once more if it changed since the last write.
func (c *Client) persistLoop(ctx context.Context) {
	var written uint64
	write := func() {
		c.mu.Lock()
		r, gen := c.res, c.resGen
		c.mu.Unlock()
		if gen == written {
			return
		}
		if err := writeState(c.o.StateFile, r, time.Now()); err != nil {
			c.log.Error("persisting the xDS configuration", "file", c.o.StateFile, "err", err)
			return
		}
		written = gen
	}
	for {
		select {
		case <-c.persist:
			write()
		case <-ctx.Done():
			write()
			return
		}
	}
}

func writeState(path string, r resources, now time.Time) error {
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "%s %d\n", stateMagic, now.UnixNano())
	for _, t := range typeOrder {
		ts := r[t]
		if !ts.received {
			continue
		}
		m := &discoveryv3.DeltaDiscoveryResponse{TypeUrl: t, SystemVersionInfo: ts.version}
		for _, e := range ts.entries {
			m.Resources = append(m.Resources, &discoveryv3.Resource{Name: e.name, Version: e.version, Resource: e.raw})
		}
		if _, err := protodelim.MarshalTo(&buf, m); err != nil {
			return fmt.Errorf("encoding %s: %w", shortType(t), err)
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return err
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), ".xds-state-*")
	if err != nil {
		return err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(buf.Bytes()); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return err
	}
	if err := tmp.Close(); err != nil {
		return err
	}
	return os.Rename(tmp.Name(), path)
}

// readState returns the persisted resources (nil when there is no file)
// and when they were saved. Every resource is validated again, as if it
// had just arrived.
func readState(path string) (resources, time.Time, error) {
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil, time.Time{}, nil
	}
	if err != nil {
		return nil, time.Time{}, fmt.Errorf("reading the persisted xDS configuration: %w", err)
	}
	defer f.Close()
	br := bufio.NewReader(f)
	header, err := br.ReadString('\n')
	bad := func(format string, a ...any) (resources, time.Time, error) {
		return nil, time.Time{}, fmt.Errorf("persisted xDS configuration %s: %s", path, fmt.Sprintf(format, a...))
	}
	if err != nil || !strings.HasPrefix(header, stateMagic+" ") {
		return bad("not a meshlet xDS state file")
	}
	ns, err := strconv.ParseInt(strings.TrimSpace(strings.TrimPrefix(header, stateMagic+" ")), 10, 64)
	if err != nil {
		return bad("bad header %q", strings.TrimSpace(header))
	}
	saved := time.Unix(0, ns)
	r := newResources()
	for {
		m := &discoveryv3.DeltaDiscoveryResponse{}
		err := protodelim.UnmarshalFrom(br, m)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return bad("%v", err)
		}
		ts := r[m.GetTypeUrl()]
		if ts == nil {
			return bad("unknown type %q", m.GetTypeUrl())
		}
		ts.version, ts.received = m.GetSystemVersionInfo(), true
		for _, x := range m.GetResources() {
			e, err := decode(m.GetTypeUrl(), x.GetResource(), x.GetVersion(), saved, nil)
			if err != nil {
				return bad("%v", err)
			}
			ts.entries[e.name] = e
		}
	}
	return r, saved, nil
}
