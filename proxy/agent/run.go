package agent

import (
	"cmp"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/meshlet/meshlet/internal/exepages"
	"github.com/meshlet/meshlet/internal/filewatch"
	"github.com/meshlet/meshlet/proxy/config"
	"github.com/meshlet/meshlet/proxy/identity"
)

type eventKind int

const (
	evReload eventKind = iota
	evReady
	evFailed
	evExit
	evRestart
	evDrain
	evQuit
	evShutdown
	evForward
	evIdentity
)

type event struct {
	kind   eventKind
	gen    *generation
	pid    int
	status unix.WaitStatus
	err    error
	reason string
	reply  chan ReloadResult
	sig    syscall.Signal // evForward
	// evIdentity: the new certificate and its bundle (which holds the key).
	cert   *tls.Certificate
	bundle []byte
}

// ReloadResult is the outcome of a reload request.
type ReloadResult struct {
	Generation int    `json:"generation"`
	Error      string `json:"error,omitempty"`
	// Skipped is set when the configuration did not change.
	Skipped bool `json:"skipped,omitempty"`
}

// Reload asks for a hot restart and, when reply is not nil, reports the
// outcome on it.
func (a *Agent) Reload(reason string, reply chan ReloadResult) {
	a.post(event{kind: evReload, reason: reason, reply: reply})
}

// ErrQuit is returned by Run after /quitquitquit.
var ErrQuit = errors.New("quit requested")

// loop state
type runState struct {
	gens     map[int]*generation // by pid: every live process
	active   *generation
	starting *generation
	next     int
	pending  bool
	// pendingForce: a coalesced request was explicit (not a file event),
	// so it restarts even when the config is unchanged.
	pendingForce bool
	waiters      []chan ReloadResult // for the starting generation
	pwaiters     []chan ReloadResult // for the pending reload
	backoff      time.Duration
	shutdown     bool
	drained      bool // /drain: do not restart
	cfg          *config.Loaded
}

// ForwardedSignals are the signals the agent passes on to every generation
// that has reported ready (a generation still starting has not installed
// its handlers, and Go's default action for SIGUSR1/SIGUSR2 is to exit).
var ForwardedSignals = []syscall.Signal{syscall.SIGUSR1, syscall.SIGUSR2}

// Run starts generation 1 and supervises until ctx is cancelled, SIGTERM or
// SIGINT (drain and exit; ctx cancellation counts as SIGTERM), or
// /quitquitquit. It handles SIGHUP (reload), forwards ForwardedSignals, and
// reaps on SIGCHLD (every child, including orphans when the agent is a
// subreaper).
func (a *Agent) Run(ctx context.Context) error {
	defer a.closeSocks()
	defer a.status.Close()

	sigs := make(chan os.Signal, 16)
	notify := []os.Signal{syscall.SIGHUP, syscall.SIGCHLD, syscall.SIGTERM, syscall.SIGINT}
	for _, s := range ForwardedSignals {
		notify = append(notify, s)
	}
	signal.Notify(sigs, notify...)
	defer signal.Stop(sigs)
	defer close(a.done)
	go a.signals(sigs)

	hs := &http.Server{Handler: a.statusMux(), ReadHeaderTimeout: 5 * time.Second}
	go func() { _ = hs.Serve(a.status) }()
	defer hs.Close()

	if a.o.ConfigPath != "" {
		stop, err := a.watch()
		if err != nil {
			return err
		}
		defer stop()
	}

	st := &runState{gens: map[int]*generation{}, next: 1}
	cfg, err := a.loadConfig()
	if err != nil {
		return fmt.Errorf("initial configuration: %w", err)
	}
	a.watchFiles(cfg)
	st.cfg = cfg
	if a.idc != nil {
		stop := a.runIdentity(ctx)
		defer stop()
		a.log.Info("waiting for the workload certificate before starting the proxy", "ca", a.o.CAAddress)
	} else {
		a.startGen(st, cfg)
	}

	var shutdownDeadline <-chan time.Time
	shutdown := func(why string) {
		if st.shutdown {
			return
		}
		a.beginShutdown(st, why)
		t := time.NewTimer(a.o.DrainDuration + time.Second)
		shutdownDeadline = t.C
	}
	for {
		var ev event
		select {
		case ev = <-a.events:
		case <-ctx.Done():
			shutdown("context cancelled")
			ctx = context.Background() // fire once
			continue
		case <-shutdownDeadline:
			a.log.Warn("drain deadline passed; killing generations", "generations", len(st.gens))
			a.killAll(st)
			return nil
		}
		switch ev.kind {
		case evReload:
			a.reload(st, ev)
		case evReady:
			a.onReady(st, ev.gen)
		case evFailed:
			a.onFailed(st, ev.gen, ev.err)
		case evExit:
			a.onExit(st, ev.pid, ev.status)
		case evRestart:
			if st.active == nil && st.starting == nil && !st.shutdown && !st.drained && !a.awaitingIdentity() {
				a.startGen(st, st.cfg)
			}
		case evIdentity:
			a.onIdentity(st, ev.cert, ev.bundle)
		case evDrain:
			if st.active != nil && !st.drained {
				st.drained = true
				a.setState("DRAINING")
				st.active.drainShutdown()
			}
		case evShutdown:
			shutdown(ev.reason)
		case evForward:
			a.forward(st, ev.sig)
		case evQuit:
			a.log.Info("quitquitquit: exiting now")
			a.killAll(st)
			return ErrQuit
		}
		if st.shutdown && len(st.gens) == 0 {
			a.log.Info("all generations exited; agent done")
			return nil
		}
		a.publish(st)
	}
}

// errAwaitingIdentity answers a reload before the first generation, which
// waits for the workload certificate.
var errAwaitingIdentity = errors.New("no generation yet: waiting for the first workload certificate (the new configuration is used when it arrives)")

// awaitingIdentity reports whether generations wait for the first
// workload certificate.
func (a *Agent) awaitingIdentity() bool { return a.idc != nil && a.idBundle == nil }

// runIdentity runs the identity client until the returned stop is called,
// posting every certificate it obtains (the first one and each renewal) to
// Run as an evIdentity event. The client retries a CA that is down with
// backoff; meanwhile generations keep the certificate they have.
func (a *Agent) runIdentity(ctx context.Context) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	a.idc.Subscribe(func(cert *tls.Certificate) {
		b, err := identity.MarshalBundle(cert, a.idc.Roots())
		if err != nil {
			a.log.Error("workload certificate cannot be handed to the proxy", "err", err)
			return
		}
		select {
		case a.events <- event{kind: evIdentity, cert: cert, bundle: b}:
		case <-a.done:
		case <-ctx.Done(): // stop waits for the client: never block it
		}
	})
	go func() {
		defer close(done)
		_ = a.idc.Run(ctx) // returns nil when ctx ends
	}()
	// The mesh roots change for a root rotation (the ConfigMap gets the new
	// root beside the old): generations get them at once, not only with
	// the next certificate.
	rootFile := cmp.Or(a.o.RootCertFile, identity.DefaultRootCertFile)
	w, err := filewatch.New(a.idc.RootsChanged, filewatch.Options{Logger: a.log})
	if err == nil {
		if err = w.SetFiles(rootFile); err != nil {
			_ = w.Close()
		}
	}
	if err != nil {
		a.log.Warn("not watching the mesh roots; a change reaches the proxy with the next certificate", "file", rootFile, "err", err)
		w = nil
	}
	return func() {
		if w != nil {
			_ = w.Close()
		}
		cancel()
		<-done
		_ = a.idc.Close()
	}
}

// onIdentity takes a new workload certificate: every live generation gets
// it at once (the one starting too: its first message came earlier), and
// the first one lets the first generation start.
func (a *Agent) onIdentity(st *runState, cert *tls.Certificate, b []byte) {
	first := a.idBundle == nil
	clear(a.idBundle)
	a.idBundle = b
	a.identityUpdates.Inc()
	sent := 0
	for _, g := range st.gens {
		if err := g.sendIdentity(b); err != nil {
			a.identitySendFailures.Inc()
			a.log.Error("workload identity not sent; the generation keeps its certificate", "generation", g.n, "err", err)
			continue
		}
		sent++
	}
	leaf := cert.Leaf
	a.mu.Lock()
	a.info.Identity = &IdentityInfo{SPIFFE: leaf.URIs[0].String(), Serial: leaf.SerialNumber.Text(16), NotBefore: leaf.NotBefore.UTC(), NotAfter: leaf.NotAfter.UTC()}
	a.mu.Unlock()
	a.log.Info("workload identity handed to the proxy", "identity", leaf.URIs[0].String(), "serial", leaf.SerialNumber.Text(16),
		"notAfter", leaf.NotAfter.UTC().Format(time.RFC3339), "generations", sent)
	if first && st.active == nil && st.starting == nil && !st.shutdown && !st.drained {
		a.startGen(st, st.cfg)
	}
}

func (a *Agent) signals(sigs chan os.Signal) {
	for {
		select {
		case <-a.done:
			return
		case s := <-sigs:
			switch s {
			case syscall.SIGHUP:
				a.log.Info("SIGHUP: reloading")
				a.post(event{kind: evReload, reason: "SIGHUP"})
			case syscall.SIGCHLD:
				a.reap()
			case syscall.SIGTERM, syscall.SIGINT:
				a.post(event{kind: evShutdown, reason: unix.SignalName(s.(syscall.Signal))})
			default:
				a.post(event{kind: evForward, sig: s.(syscall.Signal)})
			}
		}
	}
}

// forward passes sig on to every generation that has reported ready.
func (a *Agent) forward(st *runState, sig syscall.Signal) {
	name := unix.SignalName(sig)
	n := 0
	for _, g := range st.gens {
		if g.state != "ACTIVE" && g.state != "DRAINING" {
			continue
		}
		if err := g.proc.Signal(sig); err == nil {
			n++
		}
	}
	a.region.Counter(fmt.Sprintf("meshlet_agent_signals_forwarded_total{signal=%q}", name)).Inc()
	a.log.Info("forwarded signal", "signal", name, "generations", n)
}

// post delivers an event to Run, or drops it once Run has returned.
func (a *Agent) post(ev event) {
	select {
	case a.events <- ev:
	case <-a.done:
	}
}

// reap collects every exited child (ours and, as subreaper, orphans).
func (a *Agent) reap() {
	for {
		var ws unix.WaitStatus
		pid, err := unix.Wait4(-1, &ws, unix.WNOHANG, nil)
		if err == unix.EINTR {
			continue
		}
		if pid <= 0 || err != nil {
			return
		}
		a.post(event{kind: evExit, pid: pid, status: ws})
	}
}

func (a *Agent) startGen(st *runState, cfg *config.Loaded) {
	n := st.next
	st.next++
	g, err := a.spawn(n, cfg, st.active != nil)
	if err != nil {
		a.log.Error("starting generation failed", "generation", n, "err", err)
		a.failReload(st, fmt.Errorf("generation %d: %w", n, err))
		a.scheduleRestart(st)
		return
	}
	st.gens[g.pid] = g
	st.starting = g
}

func (a *Agent) reload(st *runState, ev event) {
	if st.shutdown || st.drained {
		reply(ev.reply, ReloadResult{Error: "agent is draining"})
		return
	}
	if st.starting != nil || len(st.gens) >= 2 {
		// At most two generations: coalesce into one pending reload.
		st.pending = true
		st.pendingForce = st.pendingForce || ev.reason != "watch"
		if ev.reply != nil {
			st.pwaiters = append(st.pwaiters, ev.reply)
		}
		return
	}
	cfg, err := a.loadConfig()
	a.watchFiles(cfg)
	if err != nil {
		a.log.Error("reload rejected: invalid configuration; the current generation keeps serving", "reason", ev.reason, "err", err)
		a.failReload(st, err)
		reply(ev.reply, ReloadResult{Error: err.Error()})
		return
	}
	if a.awaitingIdentity() {
		// No generation yet: the first one starts with this configuration
		// once the certificate is in.
		st.cfg = cfg
		reply(ev.reply, ReloadResult{Error: errAwaitingIdentity.Error()})
		return
	}
	if (ev.reason == "watch" || ev.reason == "pending-watch") && st.active != nil && cfg.Hash == st.active.cfg.Hash {
		a.log.Info("configuration unchanged; not restarting", "reason", ev.reason, "configHash", cfg.Hash)
		// What is on disk again is what runs (a bad rotation rolled back):
		// an earlier failure no longer describes it.
		a.region.SetNote("")
		a.mu.Lock()
		a.info.LastReloadError = ""
		a.mu.Unlock()
		reply(ev.reply, ReloadResult{Generation: st.active.n, Skipped: true})
		return
	}
	a.log.Info("hot restart", "reason", ev.reason, "configHash", cfg.Hash)
	a.startGen(st, cfg)
	if ev.reply != nil {
		st.waiters = append(st.waiters, ev.reply)
	}
}

func reply(ch chan ReloadResult, r ReloadResult) {
	if ch != nil {
		ch <- r
	}
}

func (a *Agent) failReload(st *runState, err error) {
	a.reloadFail.Inc()
	a.region.SetNote(err.Error())
	a.mu.Lock()
	a.info.LastReloadError = err.Error()
	a.mu.Unlock()
	for _, w := range st.waiters {
		reply(w, ReloadResult{Error: err.Error()})
	}
	st.waiters = nil
}

func (a *Agent) onReady(st *runState, g *generation) {
	if g != st.starting {
		return
	}
	st.starting = nil
	if st.shutdown || st.drained {
		g.state = "DRAINING"
		g.drainShutdown()
		return
	}
	g.state = "ACTIVE"
	g.readyAt = time.Now()
	// Once a generation serves, unmap the code and read-only data the
	// agent's start-up touched (the initialisers of the one binary) and,
	// after a reload, what reading and checking the configuration touched:
	// several MiB each time, not needed again until the next reload.
	if n, err := exepages.Release(); err != nil {
		a.log.Warn("releasing start-up pages", "err", err)
	} else {
		a.log.Debug("released start-up pages", "bytes", n)
	}
	old := st.active
	st.active = g
	st.cfg = g.cfg
	took := g.readyAt.Sub(g.started)
	if old != nil {
		old.state = "DRAINING"
		if err := old.drainHotRestart(g); err != nil {
			a.log.Warn("hand-over not started; the old generation drains without it", "generation", old.n, "err", err)
		}
		a.reloadOK.Inc()
	}
	if p := g.takePeer(); p != nil {
		_ = p.Close() // nothing to replace (it died meanwhile)
	}
	a.region.SetNote("")
	a.mu.Lock()
	a.info.LastReloadError = ""
	a.info.LastReloadSeconds = took.Seconds()
	a.mu.Unlock()
	a.log.Info("generation ready", "generation", g.n, "pid", g.pid, "startup", took, "previous", genNum(old))
	// /server_info shows the new generation before a reload is answered: a
	// caller that reads it after POST /reload returned must not see the old
	// one (the loop publishes only after this event).
	a.publish(st)
	for _, w := range st.waiters {
		reply(w, ReloadResult{Generation: g.n})
	}
	st.waiters = nil
	a.maybePending(st)
}

func genNum(g *generation) int {
	if g == nil {
		return 0
	}
	return g.n
}

func (a *Agent) onFailed(st *runState, g *generation, err error) {
	if g != st.starting {
		return
	}
	st.starting = nil
	g.state = "FAILED"
	_ = g.proc.Signal(syscall.SIGKILL)
	if p := g.takePeer(); p != nil {
		_ = p.Close()
	}
	err = fmt.Errorf("generation %d failed to start: %w", g.n, err)
	if st.active != nil {
		a.log.Error("hot restart failed; the current generation keeps serving", "generation", g.n, "active", st.active.n, "err", err)
	} else {
		a.log.Error("generation failed to start", "generation", g.n, "err", err)
	}
	a.failReload(st, err)
	if st.active == nil {
		a.scheduleRestart(st)
	}
	// pending reloads are retried when the failed process has been reaped
}

func (a *Agent) onExit(st *runState, pid int, ws unix.WaitStatus) {
	g, ok := st.gens[pid]
	if !ok {
		a.log.Debug("reaped orphan", "pid", pid, "status", ws)
		return
	}
	delete(st.gens, pid)
	_ = g.proc.Release()
	_ = g.control.Close()
	if p := g.takePeer(); p != nil {
		_ = p.Close()
	}
	how := exitString(ws)
	switch {
	case g == st.active:
		st.active = nil
		if st.shutdown || st.drained {
			a.log.Info("generation exited", "generation", g.n, "status", how)
			break
		}
		a.crashes.Inc()
		a.log.Error("generation died; restarting", "generation", g.n, "status", how, "after", time.Since(g.started))
		if time.Since(g.readyAt) > 10*time.Second {
			st.backoff = 0
		}
		a.scheduleRestart(st)
	case g == st.starting:
		a.onFailed(st, g, fmt.Errorf("exited (%s)", how))
	default:
		a.log.Info("generation exited", "generation", g.n, "state", g.state, "status", how)
	}
	a.maybePending(st)
}

func exitString(ws unix.WaitStatus) string {
	if ws.Signaled() {
		return "signal: " + ws.Signal().String()
	}
	return fmt.Sprintf("exit code %d", ws.ExitStatus())
}

func (a *Agent) maybePending(st *runState) {
	if !st.pending || st.starting != nil || len(st.gens) >= 2 || st.active == nil {
		return
	}
	reason := "pending-watch"
	if st.pendingForce {
		reason = "pending"
	}
	st.pending, st.pendingForce = false, false
	ws := st.pwaiters
	st.pwaiters = nil
	a.reload(st, event{kind: evReload, reason: reason})
	st.waiters = append(st.waiters, ws...)
	if st.starting == nil { // reload failed or skipped synchronously
		for _, w := range ws {
			reply(w, ReloadResult{Error: a.lastError()})
		}
		st.waiters = nil
	}
}

func (a *Agent) lastError() string {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.info.LastReloadError
}

// scheduleRestart starts a new generation after the backoff: at once the
// first time, then doubling from 200ms to 10s.
func (a *Agent) scheduleRestart(st *runState) {
	if st.shutdown || st.drained {
		return
	}
	d := st.backoff
	st.backoff = min(max(2*st.backoff, 200*time.Millisecond), 10*time.Second)
	a.log.Info("restarting generation", "in", d)
	time.AfterFunc(d, func() { a.post(event{kind: evRestart}) })
}

func (a *Agent) beginShutdown(st *runState, why string) {
	st.shutdown = true
	a.setState("DRAINING")
	a.log.Info("shutting down: draining", "signal", why, "deadline", a.o.DrainDuration)
	// New inbound connections are refused from now on instead of waiting
	// in a backlog nobody will serve.
	var keep []sock
	for _, s := range a.socks {
		if s.name == fdInbound {
			s.file.Close()
			continue
		}
		keep = append(keep, s)
	}
	a.socks = keep
	for _, g := range st.gens {
		if g == st.active {
			g.drainShutdown()
		} else if g.state == "STARTING" {
			_ = g.proc.Signal(syscall.SIGKILL)
		}
	}
}

// killAll kills every generation and waits (briefly) until they are gone,
// so none outlives the agent.
func (a *Agent) killAll(st *runState) {
	for _, g := range st.gens {
		_ = g.proc.Signal(syscall.SIGKILL)
	}
	deadline := time.Now().Add(2 * time.Second)
	for _, g := range st.gens {
		for time.Now().Before(deadline) {
			var ws unix.WaitStatus
			pid, err := unix.Wait4(g.pid, &ws, unix.WNOHANG, nil)
			if pid == g.pid || err == unix.ECHILD {
				break
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

func (a *Agent) setState(s string) {
	a.mu.Lock()
	a.info.State = s
	a.mu.Unlock()
}

// publish copies the loop's view into the /server_info document.
func (a *Agent) publish(st *runState) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.info.Generations = a.info.Generations[:0]
	for _, g := range st.gens {
		a.info.Generations = append(a.info.Generations, GenInfo{Generation: g.n, PID: g.pid, State: g.state, ConfigHash: g.cfg.Hash})
	}
	a.info.ActiveGeneration = genNum(st.active)
	a.info.Ready = st.active != nil && !st.shutdown && !st.drained
	if st.active != nil {
		a.info.ConfigHash = st.active.cfg.Hash
	}
	if a.info.Ready {
		a.info.State = "LIVE"
	} else if st.shutdown || st.drained {
		a.info.State = "DRAINING"
	} else {
		a.info.State = "STARTING"
	}
	a.info.Restarts = a.crashes.Value()
}
