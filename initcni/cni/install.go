package cni

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"

	"github.com/meshlet/meshlet/initcni/capture"
	"github.com/meshlet/meshlet/internal/filewatch"
)

// Installer file names.
const (
	BinaryName     = "meshlet"
	KubeconfigName = "meshlet-cni.kubeconfig"
)

// ErrNoPrimaryConfig means the conf dir holds no CNI config to chain onto yet.
var ErrNoPrimaryConfig = errors.New("no primary CNI config found")

// InstallOptions configure the installer. Zero values mean defaults.
type InstallOptions struct {
	ConfDir  string // default /etc/cni/net.d
	BinDir   string // default /opt/cni/bin
	ConfName string // primary config file name; default: the first one kubelet would pick
	// SelfBinary is the meshlet binary to install (default os.Executable()).
	SelfBinary string
	// Kubeconfig is the kubeconfig content the plugin uses (see
	// InClusterKubeconfig); nil keeps an existing file.
	Kubeconfig []byte
	// Entry is the plugin's conflist entry (type and kubeconfig are set by
	// the installer).
	Entry PluginConf
	// Resync re-applies everything periodically, picking up rotated
	// service-account tokens (default 1m).
	Resync time.Duration
	Logger *slog.Logger
}

func (o *InstallOptions) defaults() {
	if o.ConfDir == "" {
		o.ConfDir = "/etc/cni/net.d"
	}
	if o.BinDir == "" {
		o.BinDir = "/opt/cni/bin"
	}
	if o.Resync == 0 {
		o.Resync = time.Minute
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// KubeconfigPath is where the plugin's kubeconfig is written.
func (o InstallOptions) KubeconfigPath() string { return filepath.Join(o.ConfDir, KubeconfigName) }

// InClusterKubeconfig builds a kubeconfig from a service-account directory
// (token, ca.crt) and the API server address.
func InClusterKubeconfig(saDir, server string) ([]byte, error) {
	token, err := os.ReadFile(filepath.Join(saDir, "token"))
	if err != nil {
		return nil, fmt.Errorf("reading service account token: %w", err)
	}
	ca, err := os.ReadFile(filepath.Join(saDir, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("reading service account CA: %w", err)
	}
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["local"] = &clientcmdapi.Cluster{Server: server, CertificateAuthorityData: ca}
	cfg.AuthInfos["meshlet-cni"] = &clientcmdapi.AuthInfo{Token: strings.TrimSpace(string(token))}
	cfg.Contexts["meshlet-cni"] = &clientcmdapi.Context{Cluster: "local", AuthInfo: "meshlet-cni"}
	cfg.CurrentContext = "meshlet-cni"
	return clientcmd.Write(*cfg)
}

// writeAtomic writes data to path through a temp file and rename, only when
// the content differs. It reports whether it wrote.
func writeAtomic(path string, data []byte, mode os.FileMode) (bool, error) {
	if old, err := os.ReadFile(path); err == nil && bytes.Equal(old, data) {
		return false, nil
	}
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp-")
	if err != nil {
		return false, err
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(data); err != nil {
		tmp.Close()
		return false, err
	}
	if err := tmp.Chmod(mode); err != nil {
		tmp.Close()
		return false, err
	}
	if err := tmp.Close(); err != nil {
		return false, err
	}
	return true, os.Rename(tmp.Name(), path)
}

// linkAtomic points path at target (a symbolic link), replacing whatever
// was there in one rename.
func linkAtomic(target, path string) error {
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	_ = os.Remove(tmp)
	if err := os.Symlink(target, tmp); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// installBinaries copies the meshlet binary and links BinDir/meshlet-cni to
// it: the runtime executes plugins by their type name and meshlet runs as
// the plugin when called by that name (no shell needed on the node).
func installBinaries(o InstallOptions) error {
	self := o.SelfBinary
	if self == "" {
		var err error
		if self, err = os.Executable(); err != nil {
			return err
		}
	}
	data, err := os.ReadFile(self)
	if err != nil {
		return fmt.Errorf("reading %s: %w", self, err)
	}
	if err := os.MkdirAll(o.BinDir, 0o755); err != nil {
		return err
	}
	if _, err := writeAtomic(filepath.Join(o.BinDir, BinaryName), data, 0o755); err != nil {
		return fmt.Errorf("installing %s: %w", BinaryName, err)
	}
	if err := linkAtomic(BinaryName, filepath.Join(o.BinDir, PluginType)); err != nil {
		return fmt.Errorf("installing %s: %w", PluginType, err)
	}
	return nil
}

// PrimaryConfig returns the config file kubelet would use: the
// lexicographically first *.conf, *.conflist or *.json in dir.
func PrimaryConfig(dir string) (string, error) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return "", err
	}
	var names []string
	for _, e := range ents {
		n := e.Name()
		if e.IsDir() || strings.HasPrefix(n, ".") {
			continue
		}
		switch filepath.Ext(n) {
		case ".conf", ".conflist", ".json":
			names = append(names, n)
		}
	}
	sort.Strings(names)
	if len(names) == 0 {
		return "", fmt.Errorf("%w in %s", ErrNoPrimaryConfig, dir)
	}
	return filepath.Join(dir, names[0]), nil
}

// entryJSON is the plugin entry as a generic object.
func entryJSON(o InstallOptions) (map[string]any, error) {
	e := o.Entry
	e.Type = PluginType
	e.Kubeconfig = o.KubeconfigPath()
	b, err := json.Marshal(e)
	if err != nil {
		return nil, err
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	for k, v := range m { // drop empty NetConf fields
		if v == nil || v == "" {
			delete(m, k)
		}
		if mm, ok := v.(map[string]any); ok && len(mm) == 0 {
			delete(m, k)
		}
	}
	delete(m, "cniVersion")
	delete(m, "name")
	return m, nil
}

// MergeConfig returns the conflist content with meshlet's entry last
// (replacing any earlier meshlet entry), converting a single-plugin config
// into a conflist. Unknown fields are preserved.
func MergeConfig(data []byte, entry map[string]any) ([]byte, error) {
	var doc map[string]any
	if err := json.Unmarshal(data, &doc); err != nil {
		return nil, fmt.Errorf("parsing CNI config: %w", err)
	}
	plugins, isList := doc["plugins"].([]any)
	if !isList {
		if _, ok := doc["type"]; !ok {
			return nil, errors.New("CNI config has neither plugins nor type")
		}
		single := map[string]any{}
		for k, v := range doc {
			if k != "name" && k != "cniVersion" {
				single[k] = v
			}
		}
		doc = map[string]any{"name": doc["name"], "cniVersion": doc["cniVersion"], "plugins": []any{single}}
		plugins = []any{single}
	}
	var out []any
	for _, p := range plugins {
		if m, ok := p.(map[string]any); ok && m["type"] == PluginType {
			continue
		}
		out = append(out, p)
	}
	if entry != nil {
		out = append(out, entry)
	}
	doc["plugins"] = out
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return nil, err
	}
	return append(b, '\n'), nil
}

// ensureEntry merges the entry into the primary config (converting .conf
// to .conflist), writing only on change. It reports the file it manages.
func ensureEntry(o InstallOptions, entry map[string]any) (string, bool, error) {
	path := filepath.Join(o.ConfDir, o.ConfName)
	if o.ConfName != "" {
		// A named .conf we converted earlier now lives on as .conflist.
		if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
			path = strings.TrimSuffix(path, filepath.Ext(path)) + ".conflist"
		}
	} else {
		var err error
		if path, err = PrimaryConfig(o.ConfDir); err != nil {
			return "", false, err
		}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return "", false, err
	}
	merged, err := MergeConfig(data, entry)
	if err != nil {
		return "", false, fmt.Errorf("%s: %w", path, err)
	}
	target := path
	if ext := filepath.Ext(path); ext != ".conflist" {
		target = strings.TrimSuffix(path, ext) + ".conflist"
	}
	wrote, err := writeAtomic(target, merged, 0o644)
	if err != nil {
		return "", false, err
	}
	if target != path {
		// The .conf would sort before the .conflist; remove it.
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return "", false, err
		}
		wrote = true
	}
	return target, wrote, nil
}

// Install installs the binaries and kubeconfig and merges the plugin entry
// into the primary config, once.
func Install(o InstallOptions) error {
	o.defaults()
	if err := validateEntry(o.Entry); err != nil {
		return err
	}
	if err := installBinaries(o); err != nil {
		return err
	}
	return syncConfig(o)
}

func validateEntry(e PluginConf) error {
	if _, err := ConfigFromAnnotations(e.Capture.Options(), nil); err != nil {
		return fmt.Errorf("plugin capture defaults: %w", err)
	}
	if _, err := capture.ParseBackend(e.IPTablesBackend); err != nil {
		return err
	}
	return nil
}

func syncConfig(o InstallOptions) error {
	if o.Kubeconfig != nil {
		if err := os.MkdirAll(o.ConfDir, 0o755); err != nil {
			return err
		}
		if wrote, err := writeAtomic(o.KubeconfigPath(), o.Kubeconfig, 0o600); err != nil {
			return fmt.Errorf("writing kubeconfig: %w", err)
		} else if wrote {
			o.Logger.Info("kubeconfig written", "path", o.KubeconfigPath())
		}
	}
	entry, err := entryJSON(o)
	if err != nil {
		return err
	}
	path, wrote, err := ensureEntry(o, entry)
	if err != nil {
		return err
	}
	if wrote {
		o.Logger.Info("plugin entry written", "conflist", path)
	}
	return nil
}

// Uninstall removes the plugin entry, the kubeconfig and the binaries.
func Uninstall(o InstallOptions) error {
	o.defaults()
	var errs []error
	if path, _, err := ensureEntry(o, nil); err != nil && !errors.Is(err, ErrNoPrimaryConfig) {
		errs = append(errs, err)
	} else if err == nil {
		o.Logger.Info("plugin entry removed", "conflist", path)
	}
	for _, p := range []string{o.KubeconfigPath(), filepath.Join(o.BinDir, PluginType), filepath.Join(o.BinDir, BinaryName)} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Run installs, then keeps the entry in place until ctx ends — repairing it
// whenever the primary CNI plugin rewrites the config directory — and
// uninstalls on the way out. refresh, if set, is called on every resync to
// produce fresh kubeconfig content (rotated tokens).
func Run(ctx context.Context, o InstallOptions, refresh func() ([]byte, error)) error {
	o.defaults()
	if err := validateEntry(o.Entry); err != nil {
		return err
	}
	if err := installBinaries(o); err != nil {
		return err
	}
	if err := os.MkdirAll(o.ConfDir, 0o755); err != nil {
		return err
	}
	changed := make(chan struct{}, 1)
	w, err := filewatch.New(func() {
		select {
		case changed <- struct{}{}:
		default: // a sync is already due
		}
	}, filewatch.Options{Logger: o.Logger})
	if err != nil {
		return err
	}
	defer w.Close()
	if err := w.WatchDir(o.ConfDir, watchedConfName); err != nil {
		return err
	}
	sync := func() {
		if refresh != nil {
			if kc, err := refresh(); err != nil {
				o.Logger.Error("refreshing kubeconfig", "err", err)
			} else {
				o.Kubeconfig = kc
			}
		}
		if err := syncConfig(o); err != nil {
			if errors.Is(err, ErrNoPrimaryConfig) {
				o.Logger.Info("waiting for the primary CNI config", "dir", o.ConfDir)
				return
			}
			o.Logger.Error("syncing CNI config", "err", err)
		}
	}
	sync()
	tick := time.NewTicker(o.Resync)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			err := Uninstall(o)
			if err != nil {
				o.Logger.Error("uninstalling", "err", err)
			}
			return err
		case <-changed:
			sync()
		case <-tick.C:
			sync()
		}
	}
}

// watchedConfName reports whether a change to the conf dir entry name calls
// for a sync: a CNI config or the plugin's kubeconfig, never our own temp
// files (dot-prefixed).
func watchedConfName(name string) bool {
	if strings.HasPrefix(name, ".") {
		return false
	}
	return slices.Contains([]string{".conf", ".conflist", ".json"}, filepath.Ext(name)) || name == KubeconfigName
}
