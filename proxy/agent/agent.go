// Package agent is the sidecar supervisor (`meshlet agent`), PID 1 of the
// istio-proxy container. It binds every proxy listener once and keeps it for
// the life of the pod, runs proxy generations (`meshlet proxy`, re-executed
// from its own binary) that inherit those sockets, and replaces them without
// losing a connection (docs/design.md section 5):
//
//   - hot restart (config file change, SIGHUP, POST /reload): generation N+1
//     starts on the same descriptors, loads and validates its config and
//     reports ready over a pipe; only then is N told to drain, with a
//     command on its control socket that carries N+1's hand-over socket: N
//     moves its established connections to N+1 over it. The
//     watch covers the files the config references too (rotated TLS
//     certificates), and restarts only when the config hash — document and
//     referenced files — has changed. At most two generations are alive;
//     further reloads wait and coalesce. If N+1 fails (a bad config, or a
//     rotated file that is bad), N keeps serving and the failure is logged,
//     counted (meshlet_agent_reloads_total{result="failure"}) and shown in
//     /server_info.
//   - a generation that dies is restarted with backoff; the listening
//     sockets stay open meanwhile, so clients wait in the backlog.
//   - SIGTERM: the generation stops accepting inbound, fails readiness and
//     keeps outbound working; the agent exits when the generation has no
//     connection left or at the drain deadline. /quitquitquit exits at once.
//
// Counters live in a shared memory region (package stats) that every
// generation maps, so they carry across generations.
//
// The status server (15020) serves /healthz/ready (asking the generation's
// 15021 through the data path), a merged /stats/prometheus (agent, proxy and
// optionally the application), /server_info, POST /quitquitquit, POST /drain
// and POST /reload. /server_info and the POST endpoints answer only callers
// inside the pod (a loopback source address); others get 403 and are counted
// in meshlet_agent_status_denied_total{path}.
package agent

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"

	"github.com/meshlet/meshlet/internal/filewatch"
	"github.com/meshlet/meshlet/internal/meshports"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/identity"
	"github.com/meshlet/meshlet/proxy/stats"
)

// Options configure the agent. Zero values mean the documented default.
type Options struct {
	// ConfigPath is the proxy config file, watched for changes together
	// with the files it references (l7 TLS certificates and keys); empty:
	// the embedded default (pure L4 passthrough).
	ConfigPath string
	// DrainDuration is the drain deadline of a generation being replaced and
	// of the whole sidecar on SIGTERM; 0: 5s.
	DrainDuration time.Duration
	// Listener addresses. Defaults: ":15001", ":15006", ":15021", ":15090",
	// "127.0.0.1:15000", ":15020". A capture address with an empty host is
	// bound on 0.0.0.0 and, when the host has IPv6, on [::] as well.
	OutboundAddr, InboundAddr, HealthAddr, PrometheusAddr, AdminAddr, StatusAddr string
	// NoCaptureListeners leaves the capture listeners (OutboundAddr,
	// InboundAddr) unbound: nothing is redirected to them (interception
	// mode NONE, gateways), so generations serve no capture data path.
	NoCaptureListeners bool
	// Executable is the meshlet binary started as `meshlet proxy`;
	// empty: os.Executable().
	Executable string
	// ProxyArgs are extra arguments for every generation.
	ProxyArgs []string
	// StartTimeout bounds a generation's start until it reports ready; 0: 10s.
	StartTimeout time.Duration
	// AppMetricsURL, if set, is scraped and merged into /stats/prometheus.
	AppMetricsURL string
	// AllowRemoteLifecycle serves the state-changing status endpoints
	// (POST /quitquitquit, /drain, /reload) to any caller; false (the
	// default): only to a loopback source, i.e. from inside the pod, and
	// anyone else gets 403. /server_info is loopback-only either way.
	AllowRemoteLifecycle bool
	// Stdout and Stderr are given to generations; nil: os.Stdout/os.Stderr.
	Stdout, Stderr *os.File
	// Version is reported in /server_info.
	Version string
	// CAAddress is the mesh CA's host:port (the discovery Service on
	// 15012); empty: no workload identity (static and L4-only sidecars),
	// generations start at once. Set, the agent obtains the workload
	// certificate (package proxy/identity), starts the first generation
	// only once it has one, and hands every renewal to every generation
	// over its control socket.
	CAAddress string
	// CAServerName is the name the CA's serving certificate must carry;
	// empty: CAAddress's host.
	CAServerName string
	// TokenFile is the projected service-account token (audience
	// istio-ca); empty: identity.DefaultTokenFile.
	TokenFile string
	// RootCertFile holds the mesh's roots (ConfigMap istio-ca-root-cert);
	// empty: identity.DefaultRootCertFile.
	RootCertFile string
	// Log receives the agent's logs; nil: discard.
	Log *slog.Logger
}

// NewOptions returns the options with every default filled in; the
// command's flags start from these.
func NewOptions() Options {
	return Options{
		DrainDuration:  5 * time.Second,
		StartTimeout:   10 * time.Second,
		OutboundAddr:   meshports.Addr(meshports.Outbound),
		InboundAddr:    meshports.Addr(meshports.Inbound),
		HealthAddr:     meshports.Addr(meshports.Health),
		PrometheusAddr: meshports.Addr(meshports.Prometheus),
		AdminAddr:      meshports.LoopbackAddr(meshports.Admin),
		StatusAddr:     meshports.Addr(meshports.Status),
	}
}

// Validate checks o, naming the option and value of each problem; all of
// them are reported at once. Zero values (the documented defaults) pass.
func (o Options) Validate() error {
	var errs []error
	if o.DrainDuration < 0 {
		errs = append(errs, fmt.Errorf("drain duration: invalid value %s: must be positive", o.DrainDuration))
	}
	if o.StartTimeout < 0 {
		errs = append(errs, fmt.Errorf("start timeout: invalid value %s: must be positive", o.StartTimeout))
	}
	for _, a := range []struct{ name, addr string }{
		{"outbound address", o.OutboundAddr}, {"inbound address", o.InboundAddr},
		{"health address", o.HealthAddr}, {"prometheus address", o.PrometheusAddr},
		{"admin address", o.AdminAddr}, {"status address", o.StatusAddr},
		{"CA address", o.CAAddress},
	} {
		if a.addr == "" {
			continue
		}
		if _, _, err := net.SplitHostPort(a.addr); err != nil {
			errs = append(errs, fmt.Errorf("%s: invalid value %q: %w", a.name, a.addr, err))
		}
	}
	return errors.Join(errs...)
}

func (o *Options) setDefaults() error {
	if err := o.Validate(); err != nil {
		return err
	}
	// Zero values take NewOptions' defaults, so the defaults are written once.
	d := NewOptions()
	def := func(s *string, v string) {
		if *s == "" {
			*s = v
		}
	}
	def(&o.OutboundAddr, d.OutboundAddr)
	def(&o.InboundAddr, d.InboundAddr)
	def(&o.HealthAddr, d.HealthAddr)
	def(&o.PrometheusAddr, d.PrometheusAddr)
	def(&o.AdminAddr, d.AdminAddr)
	def(&o.StatusAddr, d.StatusAddr)
	if o.DrainDuration == 0 {
		o.DrainDuration = d.DrainDuration
	}
	if o.StartTimeout == 0 {
		o.StartTimeout = d.StartTimeout
	}
	if o.Executable == "" {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("finding the meshlet executable: %w", err)
		}
		o.Executable = exe
	}
	if o.Stdout == nil {
		o.Stdout = os.Stdout
	}
	if o.Stderr == nil {
		o.Stderr = os.Stderr
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	return nil
}

// sock is one listening socket the agent owns.
type sock struct {
	name string
	file *os.File
	addr *net.TCPAddr
}

// Agent supervises proxy generations.
type Agent struct {
	o       Options
	log     *slog.Logger
	socks   []sock
	status  net.Listener
	denied  statusDenials
	region  *stats.Region
	statsFD *os.File
	started time.Time

	events chan event
	done   chan struct{}
	// watcher watches the config file and the files it references; nil
	// without a config file. Used by Run's goroutine only.
	watcher *filewatch.Watcher

	// counters in the shared region
	reloadOK, reloadFail, crashes, gensStarted *stats.Counter
	identityUpdates, identitySendFailures      *stats.Counter

	// idc obtains and renews the workload certificate; nil without
	// Options.CAAddress.
	idc *identity.Client
	// idBundle is the current identity as sent to generations
	// (identity.MarshalBundle); nil until the first certificate. Used by
	// Run's goroutine only.
	idBundle []byte

	healthURL, promURL string // set in New, read-only after

	mu   sync.Mutex // guards info
	info Info
}

// Info is the agent's /server_info document.
type Info struct {
	Version           string    `json:"version"`
	State             string    `json:"state"`
	ActiveGeneration  int       `json:"activeGeneration"`
	Generations       []GenInfo `json:"generations"`
	ConfigPath        string    `json:"configPath,omitempty"`
	ConfigHash        string    `json:"configHash"`
	LastReloadError   string    `json:"lastReloadError,omitempty"`
	LastReloadSeconds float64   `json:"lastReloadSeconds,omitempty"`
	Restarts          uint64    `json:"restarts"`
	// Identity describes the workload certificate in use; nil when
	// identity is off or before the first certificate.
	Identity      *IdentityInfo `json:"identity,omitempty"`
	UptimeSeconds float64       `json:"uptimeSeconds"`
	Ready         bool          `json:"ready"`
}

// IdentityInfo describes the workload certificate the agent hands to its
// generations (never the key).
type IdentityInfo struct {
	SPIFFE    string    `json:"spiffe"`
	Serial    string    `json:"serial"`
	NotBefore time.Time `json:"notBefore"`
	NotAfter  time.Time `json:"notAfter"`
}

// GenInfo describes one live generation.
type GenInfo struct {
	Generation int    `json:"generation"`
	PID        int    `json:"pid"`
	State      string `json:"state"`
	ConfigHash string `json:"configHash"`
}

// New binds every listener and creates the counter region. Nothing runs
// until Run.
func New(o Options) (*Agent, error) {
	if err := o.setDefaults(); err != nil {
		return nil, err
	}
	a := &Agent{o: o, log: o.Log, started: time.Now(), events: make(chan event, 64), done: make(chan struct{})}
	var err error
	a.region, a.statsFD, err = stats.Create()
	if err != nil {
		return nil, err
	}
	bind := []struct {
		name, addr string
		dual       bool
	}{
		{fdOutbound, o.OutboundAddr, true},
		{fdInbound, o.InboundAddr, true},
		{fdHealth, o.HealthAddr, false},
		{fdPrometheus, o.PrometheusAddr, false},
		{fdAdmin, o.AdminAddr, false},
	}
	for _, b := range bind {
		if o.NoCaptureListeners && (b.name == fdOutbound || b.name == fdInbound) {
			continue
		}
		if err := a.bind(b.name, b.addr, b.dual); err != nil {
			a.closeSocks()
			return nil, err
		}
	}
	a.status, err = net.Listen("tcp", o.StatusAddr)
	if err != nil {
		a.closeSocks()
		return nil, fmt.Errorf("binding status listener %s: %w", o.StatusAddr, err)
	}
	a.healthURL = a.localURL(fdHealth, "/healthz/ready")
	a.promURL = a.localURL(fdPrometheus, "/stats/prometheus")
	a.reloadOK = a.region.Counter(`meshlet_agent_reloads_total{result="success"}`)
	a.reloadFail = a.region.Counter(`meshlet_agent_reloads_total{result="failure"}`)
	a.crashes = a.region.Counter(`meshlet_agent_generation_crashes_total`)
	a.gensStarted = a.region.Counter(`meshlet_agent_generations_launched_total`)
	a.identityUpdates = a.region.Counter(`meshlet_agent_identity_updates_total`)
	a.identitySendFailures = a.region.Counter(`meshlet_agent_identity_send_failures_total`)
	a.info = Info{Version: o.Version, State: "STARTING", ConfigPath: o.ConfigPath}
	if o.CAAddress != "" {
		a.idc, err = identity.New(identity.Options{
			Addr: o.CAAddress, ServerName: o.CAServerName, TokenFile: o.TokenFile, RootCertFile: o.RootCertFile,
			Log: logr.FromSlogHandler(o.Log.With("component", "identity").Handler()),
		})
		if err != nil {
			a.closeSocks()
			a.status.Close()
			return nil, err
		}
	}
	return a, nil
}

// bind listens on addr and keeps only the socket's descriptor: the agent
// never accepts, it only keeps the socket (and its backlog) alive.
func (a *Agent) bind(name, addr string, dual bool) error {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("listener %s: invalid address %q: %w", name, addr, err)
	}
	type try struct {
		network, addr string
		required      bool
	}
	tries := []try{{"tcp", addr, true}}
	if dual && host == "" && port != "0" {
		tries = []try{{"tcp4", net.JoinHostPort("0.0.0.0", port), true}, {"tcp6", net.JoinHostPort("::", port), false}}
	}
	for _, t := range tries {
		ln, err := net.Listen(t.network, t.addr)
		if err != nil {
			if !t.required {
				a.log.Info("IPv6 listener not bound", "listener", name, "addr", t.addr, "err", err)
				continue
			}
			return fmt.Errorf("binding %s listener %s: %w", name, t.addr, err)
		}
		tl := ln.(*net.TCPListener)
		f, err := tl.File()
		tl.Close() // the dup in f keeps the socket and its backlog
		if err != nil {
			return fmt.Errorf("%s listener descriptor: %w", name, err)
		}
		a.socks = append(a.socks, sock{name: name, file: f, addr: ln.Addr().(*net.TCPAddr)})
	}
	return nil
}

func (a *Agent) closeSocks() {
	for _, s := range a.socks {
		s.file.Close()
	}
	a.socks = nil
}

// Addrs returns the bound address of each listener by name (outbound,
// inbound, health, prometheus, admin, status).
func (a *Agent) Addrs() map[string][]*net.TCPAddr {
	m := map[string][]*net.TCPAddr{}
	for _, s := range a.socks {
		m[s.name] = append(m[s.name], s.addr)
	}
	m["status"] = []*net.TCPAddr{a.status.Addr().(*net.TCPAddr)}
	return m
}

// Stats returns the shared counter region.
func (a *Agent) Stats() *stats.Region { return a.region }

// loadConfig reads the configured document (or the embedded default) and
// validates it.
func (a *Agent) loadConfig() (*config.Loaded, error) {
	if a.o.ConfigPath == "" {
		return config.Default(), nil
	}
	return config.LoadFile(a.o.ConfigPath)
}

// generation is one `meshlet proxy` process.
type generation struct {
	n       int
	pid     int
	proc    *os.Process
	cfg     *config.Loaded
	state   string // STARTING, ACTIVE, DRAINING, FAILED
	started time.Time
	readyAt time.Time
	// control is the agent's end of the generation's control socket (see
	// DrainShutdownCommand); closed when the generation is reaped.
	control *os.File
	// handoverPeer is the other end of this generation's hand-over socket,
	// held until it is sent to the generation being replaced (or closed
	// when there is none any more); nil once given away.
	handoverPeer *os.File
}

// drainShutdown tells the generation to drain for shutdown: stop accepting
// inbound, keep outbound until the deadline. It goes over the control
// socket, not a signal, so every user signal can be forwarded unchanged.
func (g *generation) drainShutdown() {
	_, _ = io.WriteString(g.control, DrainShutdownCommand)
}

// drainHotRestart tells g that next is ready: g drains and hands its
// established connections to next over next's hand-over socket, whose end
// goes along with the command. Without that socket (or when the command
// cannot be sent) g is sent SIGTERM: it drains and keeps its connections
// until they end or the drain deadline.
func (g *generation) drainHotRestart(next *generation) error {
	peer := next.takePeer()
	if peer == nil {
		return g.proc.Signal(syscall.SIGTERM)
	}
	defer peer.Close() // the generation has its own copy once sent
	rc, err := g.control.SyscallConn()
	if err == nil {
		cerr := rc.Write(func(fd uintptr) bool {
			err = unix.Sendmsg(int(fd), []byte(DrainHotRestartCommand), unix.UnixRights(int(peer.Fd())), nil, 0)
			return !errors.Is(err, unix.EAGAIN)
		})
		if err == nil {
			err = cerr
		}
	}
	if err != nil {
		return errors.Join(fmt.Errorf("sending the hand-over socket: %w", err), g.proc.Signal(syscall.SIGTERM))
	}
	return nil
}

// sendIdentity sends the identity bundle b on g's control socket as one
// IdentityCommand message. It never blocks: a generation that does not read
// its control socket must not stall the agent; it keeps its certificate
// until the next one.
func (g *generation) sendIdentity(b []byte) error {
	msg := make([]byte, 0, len(IdentityCommand)+1+len(b))
	msg = append(append(append(msg, IdentityCommand...), '\n'), b...)
	defer clear(msg)
	rc, err := g.control.SyscallConn()
	if err != nil {
		return fmt.Errorf("generation %d control socket: %w", g.n, err)
	}
	cerr := rc.Write(func(fd uintptr) bool {
		err = unix.Sendmsg(int(fd), msg, nil, nil, unix.MSG_DONTWAIT)
		return true
	})
	if err = errors.Join(err, cerr); err != nil {
		return fmt.Errorf("sending the workload identity to generation %d: %w", g.n, err)
	}
	return nil
}

// takePeer returns the hand-over peer and forgets it: exactly one caller
// closes it.
func (g *generation) takePeer() *os.File {
	p := g.handoverPeer
	g.handoverPeer = nil
	return p
}

// socketpair returns both ends of a unix SOCK_SEQPACKET socket pair (close
// on exec; the child gets its end through ProcAttr.Files).
func socketpair(name string) (*os.File, *os.File, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, nil, fmt.Errorf("%s socket pair: %w", name, err)
	}
	return os.NewFile(uintptr(fds[0]), name), os.NewFile(uintptr(fds[1]), name+"-child"), nil
}

// spawn starts generation n with cfg and returns once the process exists;
// its readiness is reported later as an event. With handover, n gets a
// hand-over socket whose other end waits in the generation for the one n
// replaces.
func (a *Agent) spawn(n int, cfg *config.Loaded, handover bool) (*generation, error) {
	cfgFD, err := unix.MemfdCreate("meshlet-config", 0)
	if err != nil {
		return nil, fmt.Errorf("memfd for config: %w", err)
	}
	cfgFile := os.NewFile(uintptr(cfgFD), "meshlet-config")
	defer cfgFile.Close()
	if _, err := cfgFile.Write(cfg.Raw); err != nil {
		return nil, fmt.Errorf("writing config memfd: %w", err)
	}
	rd, wr, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("readiness pipe: %w", err)
	}
	defer wr.Close()
	ctlW, ctlR, err := socketpair("control")
	if err != nil {
		rd.Close()
		return nil, err
	}
	defer ctlR.Close()
	var peer, child *os.File
	if handover {
		if peer, child, err = socketpair("handover"); err != nil {
			rd.Close()
			ctlW.Close()
			return nil, err
		}
		defer child.Close()
	}

	devnull, err := os.Open(os.DevNull)
	if err != nil {
		rd.Close()
		return nil, err
	}
	defer devnull.Close()
	files := []*os.File{devnull, a.o.Stdout, a.o.Stderr}
	var spec []string
	add := func(name string, f *os.File) {
		spec = append(spec, name+"="+strconv.Itoa(len(files)))
		files = append(files, f)
	}
	for _, s := range a.socks {
		add(s.name, s.file)
	}
	add(fdStats, a.statsFD)
	add(fdConfig, cfgFile)
	add(fdReady, wr)
	add(fdControl, ctlR)
	if child != nil {
		add(fdHandover, child)
	}

	args := append([]string{a.o.Executable, "proxy",
		"--generation", strconv.Itoa(n),
		"--drain-duration", a.o.DrainDuration.String(),
	}, a.o.ProxyArgs...)
	extra := []string{EnvInheritedFDs + "=" + strings.Join(spec, ",")}
	if a.idc != nil {
		extra = append(extra, EnvIdentity+"="+IdentityFromAgent)
	}
	env := generationEnv(os.Environ(), extra...)
	proc, err := os.StartProcess(a.o.Executable, args, &os.ProcAttr{
		Env:   env,
		Files: files,
		// If the agent dies, so do its generations: nothing would
		// supervise them. Their own process group keeps a terminal's
		// Ctrl-C (SIGINT to the foreground group) for the agent, which
		// drains them in order.
		Sys: &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true},
	})
	if err != nil {
		rd.Close()
		ctlW.Close()
		if peer != nil {
			peer.Close()
		}
		return nil, fmt.Errorf("starting generation %d (%s): %w", n, a.o.Executable, err)
	}
	a.gensStarted.Inc()
	g := &generation{n: n, pid: proc.Pid, proc: proc, cfg: cfg, state: "STARTING", started: time.Now(), control: ctlW, handoverPeer: peer}
	a.log.Info("generation starting", "generation", n, "pid", g.pid, "configHash", cfg.Hash)
	if a.idBundle != nil {
		// First on the control socket: the generation reads it before it
		// may report ready. A failure shows as a start that times out.
		if err := g.sendIdentity(a.idBundle); err != nil {
			a.identitySendFailures.Inc()
			a.log.Error("workload identity not sent to the new generation", "generation", n, "err", err)
		}
	}
	go a.awaitReady(g, rd)
	return g, nil
}

// awaitReady reads the readiness pipe and posts the outcome.
func (a *Agent) awaitReady(g *generation, rd *os.File) {
	defer rd.Close()
	_ = rd.SetReadDeadline(time.Now().Add(a.o.StartTimeout))
	buf := make([]byte, 4096)
	var got []byte
	for {
		n, err := rd.Read(buf)
		got = append(got, buf[:n]...)
		if strings.Contains(string(got), "\n") || err != nil {
			line, _, _ := strings.Cut(string(got), "\n")
			switch {
			case line == "READY":
				a.post(event{kind: evReady, gen: g})
			case strings.HasPrefix(line, "ERROR "):
				a.post(event{kind: evFailed, gen: g, err: errors.New(strings.TrimPrefix(line, "ERROR "))})
			case errors.Is(err, os.ErrDeadlineExceeded):
				a.post(event{kind: evFailed, gen: g, err: fmt.Errorf("not ready within %s", a.o.StartTimeout)})
			default:
				a.post(event{kind: evFailed, gen: g, err: errors.New("exited before reporting ready")})
			}
			return
		}
	}
}
