// Package images builds meshlet's container images as tarballs, without Docker
// and without a registry: go-containerregistry assembles the layers and writes
// docker-archive tarballs that `ctr images import` loads into a node.
//
// Four images are built:
//   - meshlet/meshlet: the static meshlet binary at /usr/local/bin/meshlet plus
//     the iptables userspace (nft and legacy backends) taken from Debian's
//     packages with the shared libraries they need; default user 1337.
//   - meshlet/pause: the sandbox image of the test cluster (test/images/pause).
//   - meshlet/echo and meshlet/echo-client: the demo HTTP server and client
//     (test/images/echo, test/images/client).
package images

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// Tag is the tag of every image built here; it matches the injection config's
// default image (meshlet/meshlet:0.1.0) so pods resolve it from the node's
// image store with imagePullPolicy IfNotPresent.
const Tag = "0.1.0"

// Image references, as pods and containerd's sandbox_image name them.
const (
	Meshlet = "meshlet/meshlet:" + Tag
	Pause   = "meshlet/pause:" + Tag
	Echo    = "meshlet/echo:" + Tag
	Client  = "meshlet/echo-client:" + Tag
)

// ProxyUID is the default user of the meshlet image (the proxy's UID and GID).
const ProxyUID = 1337

// IptablesPackages are the Debian packages whose files make up the iptables
// userspace of the meshlet image: iptables and its Depends closure (libc6's
// own dependency libgcc-s1 included; netbase gives /etc/protocols).
var IptablesPackages = []string{
	"iptables", "libip4tc2", "libip6tc2", "libxtables12", "libmnl0",
	"libnetfilter-conntrack3", "libnfnetlink0", "libnftnl11", "netbase",
	"libc6", "libgcc-s1",
}

// Options say what to build and where.
type Options struct {
	// RepoRoot is the meshlet source tree (the test programs are built from it).
	RepoRoot string
	// MeshletBinary is the static meshlet binary (`make build` output).
	MeshletBinary string
	// OutDir receives one <name>.tar per image.
	OutDir string
	// DebDir caches the downloaded Debian packages (default OutDir/debs).
	DebDir string
	// Log receives progress lines; nil discards them.
	Log io.Writer
}

// Result is one built image.
type Result struct {
	Ref     string // e.g. meshlet/meshlet:0.1.0
	Tarball string // docker-archive tarball
}

// epoch is the timestamp of every file and image: builds are reproducible.
var epoch = time.Unix(0, 0).UTC()

// BuildAll builds every image into opts.OutDir and returns them, meshlet first.
func BuildAll(ctx context.Context, opts Options) ([]Result, error) {
	if opts.Log == nil {
		opts.Log = io.Discard
	}
	if opts.DebDir == "" {
		opts.DebDir = filepath.Join(opts.OutDir, "debs")
	}
	if err := os.MkdirAll(opts.OutDir, 0o755); err != nil {
		return nil, err
	}
	var out []Result
	meshlet, err := MeshletImage(ctx, opts)
	if err != nil {
		return nil, fmt.Errorf("building %s: %w", Meshlet, err)
	}
	r, err := write(opts.OutDir, "meshlet", Meshlet, meshlet)
	if err != nil {
		return nil, err
	}
	out = append(out, r)
	for _, p := range []struct{ file, ref, pkg string }{
		{"pause", Pause, "./test/images/pause"},
		{"echo", Echo, "./test/images/echo"},
		{"echo-client", Client, "./test/images/client"},
	} {
		bin := filepath.Join(opts.OutDir, "bin", p.file)
		if err := GoBuild(ctx, opts.RepoRoot, p.pkg, bin); err != nil {
			return nil, err
		}
		uid := 65532
		if p.ref == Pause {
			uid = 65535
		}
		img, err := BinaryImage(bin, "/"+p.file, uid)
		if err != nil {
			return nil, fmt.Errorf("building %s: %w", p.ref, err)
		}
		r, err := write(opts.OutDir, p.file, p.ref, img)
		if err != nil {
			return nil, err
		}
		out = append(out, r)
	}
	for _, r := range out {
		fmt.Fprintf(opts.Log, "images: %s -> %s\n", r.Ref, r.Tarball)
	}
	return out, nil
}

func write(dir, file, ref string, img v1.Image) (Result, error) {
	tag, err := name.NewTag(ref)
	if err != nil {
		return Result{}, err
	}
	dst := filepath.Join(dir, file+".tar")
	tmp := dst + ".tmp"
	if err := tarball.WriteToFile(tmp, tag, img); err != nil {
		return Result{}, fmt.Errorf("writing %s: %w", dst, err)
	}
	return Result{Ref: ref, Tarball: dst}, os.Rename(tmp, dst)
}

// GoBuild compiles the main package pkg (relative to root) into a static
// binary at out.
func GoBuild(ctx context.Context, root, pkg, out string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags", "-s -w", "-o", out, pkg)
	cmd.Dir = root
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %w\n%s", strings.Join(cmd.Args, " "), err, b)
	}
	return nil
}

// BinaryImage is a one-layer image holding the static binary bin at path
// inside, run as uid.
func BinaryImage(bin, inside string, uid int) (v1.Image, error) {
	b, err := os.ReadFile(bin)
	if err != nil {
		return nil, err
	}
	l := newLayer()
	l.file(inside, 0o755, b)
	return image(l, []string{inside}, uid)
}

// MeshletImage is the meshlet image: the binary plus the iptables userspace.
func MeshletImage(ctx context.Context, opts Options) (v1.Image, error) {
	b, err := os.ReadFile(opts.MeshletBinary)
	if err != nil {
		return nil, fmt.Errorf("reading the meshlet binary (run make build): %w", err)
	}
	if opts.Log == nil {
		opts.Log = io.Discard
	}
	root, err := extractDebs(ctx, opts.DebDir, IptablesPackages, opts.Log)
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(root)
	l := newLayer()
	if err := l.tree(root, keepDebFile); err != nil {
		return nil, err
	}
	// Debian picks iptables' default backend with update-alternatives, which
	// dpkg-deb -x does not run: point the plain names at the nft backend
	// (Debian's default); the -nft and -legacy names stay available.
	for _, fam := range []string{"iptables", "ip6tables"} {
		for _, suffix := range []string{"", "-restore", "-save"} {
			l.symlink("/usr/sbin/"+fam+suffix, fam+"-nft"+suffix)
		}
	}
	l.file("/usr/local/bin/meshlet", 0o755, b)
	l.file("/etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/usr/sbin/nologin\nistio-proxy:x:1337:1337:istio-proxy:/nonexistent:/usr/sbin/nologin\n"))
	l.file("/etc/group", 0o644, []byte("root:x:0:\nistio-proxy:x:1337:\n"))
	l.dir("/tmp", 0o1777)
	// iptables-legacy takes its lock at /run/xtables.lock (XTABLES_LOCKFILE overrides).
	l.dir("/run", 0o755)
	if err := l.checkELF(); err != nil {
		return nil, err
	}
	return image(l, []string{"/usr/local/bin/meshlet"}, ProxyUID)
}

func image(l *layer, entrypoint []string, uid int) (v1.Image, error) {
	data, err := l.bytes()
	if err != nil {
		return nil, err
	}
	lay, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	})
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(empty.Image, lay)
	if err != nil {
		return nil, err
	}
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Created = v1.Time{Time: epoch}
	cf.Config.Entrypoint = entrypoint
	cf.Config.User = fmt.Sprintf("%d:%d", uid, uid)
	cf.Config.Env = []string{"PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	return mutate.ConfigFile(img, cf)
}

// extractDebs downloads (once, into dir) and unpacks the packages into a
// fresh folder under dir, returning it; the caller removes it.
func extractDebs(ctx context.Context, dir string, pkgs []string, log io.Writer) (string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return "", err
	}
	var debs []string
	var missing []string
	for _, p := range pkgs {
		m, _ := filepath.Glob(filepath.Join(dir, p+"_*.deb"))
		if len(m) == 0 {
			missing = append(missing, p)
			continue
		}
		debs = append(debs, m[0])
	}
	if len(missing) > 0 {
		fmt.Fprintf(log, "images: apt-get download %s\n", strings.Join(missing, " "))
		download := func() ([]byte, error) {
			cmd := exec.CommandContext(ctx, "apt-get", append([]string{"download", "-q"}, missing...)...)
			cmd.Dir = dir
			b, err := cmd.CombinedOutput()
			if err != nil {
				return b, fmt.Errorf("%s: %w\n%s", strings.Join(cmd.Args, " "), err, b)
			}
			return b, nil
		}
		if _, err := download(); err != nil {
			// A fresh machine may have no package lists yet.
			fmt.Fprintf(log, "images: apt-get update (download failed: %v)\n", err)
			if b, uerr := exec.CommandContext(ctx, "apt-get", "update", "-qq").CombinedOutput(); uerr != nil {
				return "", fmt.Errorf("apt-get update: %w\n%s", uerr, b)
			}
			if _, err := download(); err != nil {
				return "", err
			}
		}
		return extractDebs(ctx, dir, pkgs, log)
	}
	root, err := os.MkdirTemp(dir, "rootfs-")
	if err != nil {
		return "", err
	}
	for _, d := range debs {
		cmd := exec.CommandContext(ctx, "dpkg-deb", "-x", d, root)
		if b, err := cmd.CombinedOutput(); err != nil {
			return "", fmt.Errorf("%s: %w\n%s", strings.Join(cmd.Args, " "), err, b)
		}
	}
	return root, nil
}

// keepDebFile drops documentation, locales and charset converters: the image
// only needs the programs, their libraries and /etc.
func keepDebFile(p string) bool {
	for _, drop := range []string{"usr/share/", "usr/lib/x86_64-linux-gnu/gconv/", "usr/libexec/", "usr/bin/", "sbin/ldconfig"} {
		if strings.HasPrefix(p, drop) {
			return false
		}
	}
	return true
}

// layer is an in-memory filesystem tree written as one tar layer.
type layer struct {
	entries map[string]*tar.Header
	data    map[string][]byte
}

func newLayer() *layer {
	return &layer{entries: map[string]*tar.Header{}, data: map[string][]byte{}}
}

func (l *layer) parents(p string) {
	for d := path.Dir(p); d != "/" && d != "."; d = path.Dir(d) {
		if _, ok := l.entries[d]; !ok {
			l.dir(d, 0o755)
		}
	}
}

func (l *layer) dir(p string, mode int64) {
	l.parents(p)
	l.entries[p] = &tar.Header{Typeflag: tar.TypeDir, Name: strings.TrimPrefix(p, "/") + "/", Mode: mode, ModTime: epoch}
}

func (l *layer) file(p string, mode int64, b []byte) {
	l.parents(p)
	l.entries[p] = &tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(p, "/"), Mode: mode, Size: int64(len(b)), ModTime: epoch}
	l.data[p] = b
}

func (l *layer) symlink(p, target string) {
	l.parents(p)
	l.entries[p] = &tar.Header{Typeflag: tar.TypeSymlink, Name: strings.TrimPrefix(p, "/"), Linkname: target, Mode: 0o777, ModTime: epoch}
}

// tree adds every file under root for which keep(relative path) is true.
func (l *layer) tree(root string, keep func(string) bool) error {
	return filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == root {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		rel = filepath.ToSlash(rel)
		if !keep(rel) && !d.IsDir() {
			return nil
		}
		info, err := os.Lstat(p)
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
		case info.Mode()&fs.ModeSymlink != 0:
			t, err := os.Readlink(p)
			if err != nil {
				return err
			}
			l.symlink("/"+rel, t)
		case info.Mode().IsRegular():
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			l.file("/"+rel, int64(info.Mode().Perm()), b)
		}
		return nil
	})
}

// resolve follows symlinks inside the layer.
func (l *layer) resolve(p string) (string, bool) {
	for i := 0; i < 16; i++ {
		h, ok := l.entries[p]
		if !ok {
			// A parent directory may be a symlink; not used by these packages.
			return "", false
		}
		if h.Typeflag != tar.TypeSymlink {
			return p, true
		}
		if path.IsAbs(h.Linkname) {
			p = h.Linkname
		} else {
			p = path.Join(path.Dir(p), h.Linkname)
		}
	}
	return "", false
}

// libDirs is the dynamic loader's default search path on Debian amd64.
var libDirs = []string{"/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/lib", "/usr/lib"}

// checkELF verifies that every ELF program and library in the layer finds
// its interpreter and every DT_NEEDED library inside the layer, so the image
// runs without anything from the host.
func (l *layer) checkELF() error {
	var problems []string
	for p, h := range l.entries {
		if h.Typeflag != tar.TypeReg {
			continue
		}
		b := l.data[p]
		if len(b) < 4 || string(b[:4]) != "\x7fELF" {
			continue
		}
		f, err := elf.NewFile(bytes.NewReader(b))
		if err != nil {
			return fmt.Errorf("parsing %s: %w", p, err)
		}
		for _, prog := range f.Progs {
			if prog.Type == elf.PT_INTERP {
				interp, _ := io.ReadAll(prog.Open())
				ip := strings.TrimRight(string(interp), "\x00")
				if _, ok := l.resolve(ip); !ok {
					problems = append(problems, fmt.Sprintf("%s: interpreter %s missing", p, ip))
				}
			}
		}
		libs, err := f.ImportedLibraries()
		if err != nil {
			return fmt.Errorf("reading the libraries %s needs: %w", p, err)
		}
		for _, lib := range libs {
			found := false
			for _, d := range libDirs {
				if _, ok := l.resolve(d + "/" + lib); ok {
					found = true
					break
				}
			}
			if !found {
				problems = append(problems, fmt.Sprintf("%s needs %s", p, lib))
			}
		}
		f.Close()
	}
	if len(problems) > 0 {
		sort.Strings(problems)
		return fmt.Errorf("image misses shared libraries: %s", strings.Join(problems, "; "))
	}
	return nil
}

func (l *layer) bytes() ([]byte, error) {
	keys := make([]string, 0, len(l.entries))
	for k := range l.entries {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, k := range keys {
		h := l.entries[k]
		h.Format = tar.FormatPAX
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(l.data[k]); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
