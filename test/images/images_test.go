package images

import (
	"archive/tar"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// extract unpacks img's filesystem into dir.
func extract(t *testing.T, tarPath, dir string) {
	t.Helper()
	img, err := tarball.ImageFromPath(tarPath, nil)
	if err != nil {
		t.Fatal(err)
	}
	rc := mutate.Extract(img)
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, h.Name)
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, os.FileMode(h.Mode)); err != nil {
				t.Fatal(err)
			}
		case tar.TypeSymlink:
			if err := os.Symlink(h.Linkname, p); err != nil {
				t.Fatal(err)
			}
		case tar.TypeReg:
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, b, os.FileMode(h.Mode)); err != nil {
				t.Fatal(err)
			}
		}
	}
}

func TestBinaryImage(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "prog")
	if err := os.WriteFile(bin, []byte("#!binary"), 0o755); err != nil {
		t.Fatal(err)
	}
	img, err := BinaryImage(bin, "/prog", 65532)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cf.Config.User != "65532:65532" || strings.Join(cf.Config.Entrypoint, " ") != "/prog" || cf.OS != "linux" {
		t.Errorf("config = user %q entrypoint %q os %q", cf.Config.User, cf.Config.Entrypoint, cf.OS)
	}
	// Reproducible: the same input gives the same digest.
	img2, _ := BinaryImage(bin, "/prog", 65532)
	d1, _ := img.Digest()
	d2, _ := img2.Digest()
	if d1 != d2 {
		t.Errorf("digests differ for identical input: %s vs %s", d1, d2)
	}
}

func TestLayerCheckELFReportsMissingLibraries(t *testing.T) {
	b, err := os.ReadFile("/usr/sbin/xtables-nft-multi")
	if err != nil {
		t.Skipf("no dynamically linked iptables on this machine: %v", err)
	}
	l := newLayer()
	l.file("/usr/sbin/xtables-nft-multi", 0o755, b)
	err = l.checkELF()
	if err == nil || !strings.Contains(err.Error(), "libc.so.6") || !strings.Contains(err.Error(), "interpreter") {
		t.Fatalf("checkELF() = %v, want missing libc.so.6 and interpreter", err)
	}
}

// TestPrivilegedMeshletImageIptables builds the meshlet image from Debian's
// packages and runs its iptables (both backends) in a fresh network namespace
// with the image's filesystem as root: nothing comes from the host.
func TestPrivilegedMeshletImageIptables(t *testing.T) {
	if testing.Short() || os.Geteuid() != 0 {
		t.Skip("needs root (chroot, unshare) and apt-get download; skipped in -short")
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	out := t.TempDir()
	bin := filepath.Join(out, "meshlet")
	if err := GoBuild(ctx, root, "./cmd/meshlet", bin); err != nil {
		t.Fatal(err)
	}
	cache := os.Getenv("MESHLET_CACHE")
	if cache == "" {
		home, _ := os.UserHomeDir()
		cache = filepath.Join(home, ".cache", "meshlet")
	}
	img, err := MeshletImage(ctx, Options{MeshletBinary: bin, DebDir: filepath.Join(cache, "debs"), RepoRoot: root})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(out, "img"), 0o755); err != nil {
		t.Fatal(err)
	}
	r, err := write(filepath.Join(out, "img"), "meshlet", Meshlet, img)
	if err != nil {
		t.Fatal(err)
	}
	fsroot := filepath.Join(out, "rootfs")
	if err := os.Mkdir(fsroot, 0o755); err != nil {
		t.Fatal(err)
	}
	extract(t, r.Tarball, fsroot)
	cf, _ := img.ConfigFile()
	if cf.Config.User != "1337:1337" {
		t.Errorf("default user = %q, want 1337:1337 (non-root)", cf.Config.User)
	}
	script := `set -e
chroot ROOT /usr/local/bin/meshlet version
for b in nft legacy; do
  chroot ROOT /usr/sbin/iptables-$b -t nat -N ISTIO_OUTPUT
  chroot ROOT /usr/sbin/iptables-$b -t nat -A ISTIO_OUTPUT -p tcp -m owner --uid-owner 1337 -m comment --comment meshlet -j REDIRECT --to-ports 15001
  chroot ROOT /usr/sbin/iptables-$b-save -t nat
  chroot ROOT /usr/sbin/ip6tables-$b -t nat -L -n >/dev/null
done
chroot ROOT /usr/sbin/iptables -V
`
	cmd := exec.CommandContext(ctx, "unshare", "--net", "--mount-proc=/proc", "--fork", "--pid", "sh", "-c", strings.ReplaceAll(script, "ROOT", fsroot))
	b, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", cmd.Args, err, b)
	}
	got := string(b)
	for _, want := range []string{"meshlet ", "(nf_tables)"} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
	if n := strings.Count(got, "--uid-owner 1337 -m comment --comment meshlet -j REDIRECT --to-ports 15001"); n != 2 {
		t.Errorf("the rule was read back %d times, want 2 (nft and legacy):\n%s", n, got)
	}
}
