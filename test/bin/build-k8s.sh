#!/usr/bin/env bash
# build-k8s.sh builds the Kubernetes, etcd, helm and CoreDNS binaries that the
# envtest and cluster test tiers run, from the Go module proxy only, and caches
# them. A binary already in the cache is not rebuilt.
#
#   test/bin/build-k8s.sh [component ...]   # default: every component
#   test/bin/build-k8s.sh --print-dir       # the cache folder (for KUBEBUILDER_ASSETS)
#
# Components: kube-apiserver kube-controller-manager kube-scheduler kubelet
# kube-proxy kubectl etcd helm coredns. The envtest tier needs kube-apiserver,
# etcd and kubectl ("envtest" selects exactly those).
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.31.4}
ETCD_VERSION=${ETCD_VERSION:-v3.5.17}
HELM_VERSION=${HELM_VERSION:-v3.16.4}
COREDNS_VERSION=${COREDNS_VERSION:-v1.11.4}
CACHE=${MESHLET_CACHE:-$HOME/.cache/meshlet}
OUT="$CACHE/k8s-$K8S_VERSION-etcd-$ETCD_VERSION/bin"

if [[ "${1:-}" == "--print-dir" ]]; then echo "$OUT"; exit 0; fi

all=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy kubectl etcd helm coredns)
want=()
for c in "${@:-${all[@]}}"; do
  case "$c" in
    envtest) want+=(kube-apiserver etcd kubectl) ;;
    all) want+=("${all[@]}") ;;
    kube-apiserver|kube-controller-manager|kube-scheduler|kubelet|kube-proxy|kubectl|etcd|helm|coredns) want+=("$c") ;;
    *) echo "build-k8s.sh: unknown component $c (known: ${all[*]} envtest all)" >&2; exit 2 ;;
  esac
done

missing=()
for c in "${want[@]}"; do [[ -f "$OUT/$c" && -x "$OUT/$c" ]] || missing+=("$c"); done
if [[ ${#missing[@]} -eq 0 ]]; then exit 0; fi
mkdir -p "$OUT"
# Build in a private folder, then move into place: a half-built binary never
# appears in the cache, and two concurrent runs do not corrupt each other.
work=$(mktemp -d "$CACHE/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
export GOFLAGS=-mod=mod CGO_ENABLED=0 GOWORK=off

k8s_mod() {
  local dir="$work/kubernetes"
  [[ -f "$dir/go.mod" ]] && { echo "$dir"; return; }
  mkdir -p "$dir"
  # k8s.io/kubernetes replaces every staging module with ./staging/...; a
  # consumer must replace each with the published version of the same release.
  local gomod
  gomod=$(cd "$dir" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
  local staging_ver="v0${K8S_VERSION#v1}"
  {
    echo "module meshlet.test/k8sbin"
    echo "go 1.22"
    echo "require k8s.io/kubernetes $K8S_VERSION"
    grep -E '^\s*k8s.io/[^ ]+ => \./staging/' "$gomod" | awk -v v="$staging_ver" '{print "replace " $1 " => " $1 " " v}'
  } > "$dir/go.mod"
  cat > "$dir/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubelet"
	_ "k8s.io/kubernetes/cmd/kubectl"
)
GO
  (cd "$dir" && go mod tidy -e >/dev/null 2>&1 || true; go mod download >/dev/null 2>&1 || true)
  echo "$dir"
}

k8s_ldflags() {
  local minor=${K8S_VERSION#v1.}; minor=${minor%%.*}
  local f=""
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    f+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
  done
  echo "-s -w$f"
}

build_k8s() {
  local c=$1 dir
  dir=$(k8s_mod)
  echo "build-k8s.sh: building $c $K8S_VERSION" >&2
  (cd "$dir" && go build -tags tools -trimpath -ldflags "$(k8s_ldflags)" -o "$work/$c" "k8s.io/kubernetes/cmd/$c")
  mv "$work/$c" "$OUT/$c"
}

build_etcd() {
  # The module lives in etcd-src: building to "$work/etcd" when that is the
  # module folder would put the binary inside it and cache a folder.
  local dir="$work/etcd-src"; mkdir -p "$dir"
  cat > "$dir/main.go" <<'GO'
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  printf 'module meshlet.test/etcd\ngo 1.22\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > "$dir/go.mod"
  echo "build-k8s.sh: building etcd $ETCD_VERSION" >&2
  (cd "$dir" && go mod tidy >/dev/null && go build -trimpath -ldflags "-s -w" -o "$work/etcd" .)
  rm -rf "$OUT/etcd"  # a folder left there by an older version of this script
  mv "$work/etcd" "$OUT/etcd"
}

build_tool() { # name module version package
  local name=$1 mod=$2 ver=$3 pkg=$4 dir="$work/$1"; mkdir -p "$dir"
  printf 'module meshlet.test/%s\ngo 1.22\nrequire %s %s\n' "$name" "$mod" "$ver" > "$dir/go.mod"
  printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$pkg" > "$dir/tools.go"
  echo "build-k8s.sh: building $name $ver" >&2
  # No -tags tools here: the tag would reach dependencies' own tools.go files.
  # The module folder is $work/$name: build to another path, or -o would put
  # the binary inside that folder and the folder would land in the cache.
  (cd "$dir" && go mod tidy -e >/dev/null 2>&1; go build -trimpath -ldflags "-s -w" -o "$work/$name.bin" "$pkg")
  rm -rf "$OUT/$name"  # a folder left there by an older version of this script
  mv "$work/$name.bin" "$OUT/$name"
}

for c in "${missing[@]}"; do
  case "$c" in
    etcd) build_etcd ;;
    helm) build_tool helm helm.sh/helm/v3 "$HELM_VERSION" helm.sh/helm/v3/cmd/helm ;;
    coredns) build_tool coredns github.com/coredns/coredns "$COREDNS_VERSION" github.com/coredns/coredns ;;
    *) build_k8s "$c" ;;
  esac
done
echo "build-k8s.sh: binaries in $OUT" >&2
