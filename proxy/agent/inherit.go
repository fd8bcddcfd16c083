package agent

import (
	"bytes"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/meshlet/meshlet/proxy/server"
	"github.com/meshlet/meshlet/proxy/stats"
)

// EnvInheritedFDs names the environment variable through which the agent
// tells a generation which inherited file descriptor is which:
// "outbound=3,outbound=4,inbound=5,health=7,...,stats=10,config=11,ready=12,control=13".
const EnvInheritedFDs = "MESHLET_INHERITED_FDS"

// Names of inherited descriptors.
const (
	fdOutbound   = "outbound"
	fdInbound    = "inbound"
	fdHealth     = "health"
	fdPrometheus = "prometheus"
	fdAdmin      = "admin"
	fdStats      = "stats"
	fdConfig     = "config"
	fdReady      = "ready"
	fdControl    = "control"
	fdHandover   = "handover"
)

// DrainShutdownCommand is the message on the control socket that tells a
// generation to drain for shutdown (server.Shutdown).
const DrainShutdownCommand = "DRAIN shutdown"

// DrainHotRestartCommand is the message on the control socket, carrying one
// descriptor (SCM_RIGHTS), that tells a generation its successor is ready:
// drain for a hot restart and hand established connections over the
// attached unix socket, whose other end is the successor's "handover"
// descriptor (server.Server.HandOver).
const DrainHotRestartCommand = "DRAIN hot-restart"

// IdentityCommand is the message on the control socket that carries the
// workload identity: the line "identity", a newline, then the bundle
// (identity.MarshalBundle: chain, key, roots). The agent sends it to every
// live generation on each new certificate, and to each new generation
// right after it starts.
const IdentityCommand = "identity"

// EnvIdentity names the environment variable that tells a generation the
// agent hands it the workload identity (value IdentityFromAgent): it
// reports ready only once the first IdentityCommand arrived.
const EnvIdentity = "MESHLET_IDENTITY"

// IdentityFromAgent is EnvIdentity's value when the agent runs the identity
// client.
const IdentityFromAgent = "control"

// maxCommand bounds one control message: a command line and, for
// IdentityCommand, the bundle.
const maxCommand = 64 << 10

// Command is one message from the agent on the control socket.
type Command struct {
	// Line is the command text (the message's first line).
	Line string
	// Payload is what follows the first line (the bundle of
	// IdentityCommand); nil for the other commands. It may hold a private
	// key: never log it.
	Payload []byte
	// File is the descriptor the command carries, if any; the receiver
	// owns it.
	File *os.File
}

// Inherited is what a generation received from the agent.
type Inherited struct {
	Listeners server.Listeners
	Stats     *stats.Region
	// Config is the configuration document to load.
	Config []byte
	// Ready is the write end of the readiness pipe.
	Ready *os.File
	// Control is the generation's end of the control socket (see
	// Commands).
	Control *os.File
	// Handover, when the generation replaces a running one, is its end of
	// the hand-over socket (server.Options.Handover).
	Handover *net.UnixConn
}

// Inherit reads the descriptors described by spec (the value of
// EnvInheritedFDs). It returns nil, nil when spec is empty.
func Inherit(spec string) (*Inherited, error) {
	if spec == "" {
		return nil, nil
	}
	in := &Inherited{}
	for _, item := range strings.Split(spec, ",") {
		name, num, ok := strings.Cut(item, "=")
		fd, err := strconv.Atoi(num)
		if !ok || err != nil || fd < 3 {
			return nil, fmt.Errorf("%s: invalid entry %q", EnvInheritedFDs, item)
		}
		f := os.NewFile(uintptr(fd), name)
		if f == nil {
			return nil, fmt.Errorf("%s: fd %d (%s) is not open", EnvInheritedFDs, fd, name)
		}
		switch name {
		case fdOutbound, fdInbound, fdHealth, fdPrometheus, fdAdmin:
			ln, err := net.FileListener(f)
			f.Close() // FileListener made its own copy
			if err != nil {
				return nil, fmt.Errorf("inherited listener %s (fd %d): %w", name, fd, err)
			}
			tl, ok := ln.(*net.TCPListener)
			if !ok {
				return nil, fmt.Errorf("inherited listener %s (fd %d) is not TCP", name, fd)
			}
			switch name {
			case fdOutbound:
				in.Listeners.Outbound = append(in.Listeners.Outbound, tl)
			case fdInbound:
				in.Listeners.Inbound = append(in.Listeners.Inbound, tl)
			case fdHealth:
				in.Listeners.Health = tl
			case fdPrometheus:
				in.Listeners.Prometheus = tl
			case fdAdmin:
				in.Listeners.Admin = tl
			}
		case fdStats:
			r, err := stats.Open(f)
			f.Close()
			if err != nil {
				return nil, err
			}
			in.Stats = r
		case fdConfig:
			b, err := io.ReadAll(io.NewSectionReader(f, 0, 1<<24))
			f.Close()
			if err != nil {
				return nil, fmt.Errorf("reading inherited config (fd %d): %w", fd, err)
			}
			in.Config = b
		case fdReady:
			in.Ready = f
		case fdControl:
			in.Control = f
		case fdHandover:
			c, err := net.FileConn(f)
			f.Close()
			if err != nil {
				return nil, fmt.Errorf("inherited hand-over socket (fd %d): %w", fd, err)
			}
			uc, ok := c.(*net.UnixConn)
			if !ok {
				c.Close()
				return nil, fmt.Errorf("inherited hand-over socket (fd %d) is not a unix socket", fd)
			}
			in.Handover = uc
		default:
			f.Close()
			return nil, fmt.Errorf("%s: unknown descriptor name %q", EnvInheritedFDs, name)
		}
	}
	return in, nil
}

// ReportReady tells the agent the generation serves. No-op when w is nil.
func ReportReady(w *os.File) {
	if w == nil {
		return
	}
	_, _ = io.WriteString(w, "READY\n")
	_ = w.Close()
}

// ReportFailure tells the agent the generation cannot start, and why.
func ReportFailure(w *os.File, err error) {
	if w == nil {
		return
	}
	_, _ = io.WriteString(w, "ERROR "+strings.ReplaceAll(err.Error(), "\n", "; ")+"\n")
	_ = w.Close()
}

// Commands delivers each message the agent sends on the control socket r,
// with the descriptor it carries; the channel is closed when the agent
// closes its end (or dies). Nil r: nil channel.
func Commands(r *os.File) <-chan Command {
	if r == nil {
		return nil
	}
	ch := make(chan Command, 4)
	nc, err := net.FileConn(r)
	r.Close()
	uc, ok := nc.(*net.UnixConn)
	if err != nil || !ok {
		if nc != nil {
			nc.Close()
		}
		close(ch)
		return ch
	}
	go func() {
		defer close(ch)
		defer uc.Close()
		buf := make([]byte, maxCommand)
		oob := make([]byte, unix.CmsgSpace(4))
		for {
			n, oobn, flags, _, err := uc.ReadMsgUnix(buf, oob)
			if err != nil || n == 0 && oobn == 0 {
				return
			}
			line, payload, _ := bytes.Cut(buf[:n], []byte("\n"))
			cmd := Command{Line: strings.TrimSpace(string(line))}
			if len(payload) > 0 {
				cmd.Payload = bytes.Clone(payload)
			}
			clear(buf[:n]) // no copy of a key left behind in the buffer
			if flags&unix.MSG_TRUNC != 0 {
				// Cut short: a payload that cannot be trusted.
				cmd.Payload = nil
				cmd.Line += " (truncated)"
			}
			if cms, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
				for _, cm := range cms {
					fds, err := unix.ParseUnixRights(&cm)
					if err != nil {
						continue
					}
					for _, fd := range fds {
						if cmd.File == nil {
							cmd.File = os.NewFile(uintptr(fd), "agent-"+cmd.Line)
						} else {
							_ = unix.Close(fd) // one descriptor per command
						}
					}
				}
			}
			ch <- cmd
		}
	}()
	return ch
}
