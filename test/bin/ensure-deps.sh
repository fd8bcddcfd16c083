#!/usr/bin/env bash
# Installs, from Debian's packages, what the test tiers need and the machine
# lacks; `make test` runs it first, so the README's test command works on a
# fresh Debian machine that has only Go.
#
#   test/bin/ensure-deps.sh                 # every package the tiers need
#   test/bin/ensure-deps.sh make git        # just these
#   test/bin/ensure-deps.sh --require-root  # first fail unless running as root
#
# What each package is for: iptables, nftables (both iptables back ends, the
# capture tier), iproute2 (`ip netns`, veth), conntrack (the capture tier's
# original-destination checks), containerd, runc, containernetworking-plugins
# (the real-cluster tier's node), busybox-static (the cluster tier's test
# images), make, git (the build itself).
set -euo pipefail

require_root=
pkgs=()
for a in "$@"; do
  case "$a" in
    --require-root) require_root=1 ;;
    -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "ensure-deps: unknown flag $a" >&2; exit 2 ;;
    *) pkgs+=("$a") ;;
  esac
done
if [ ${#pkgs[@]} -eq 0 ]; then
  pkgs=(make git iptables nftables iproute2 conntrack containerd runc containernetworking-plugins busybox-static)
fi

if [ -n "$require_root" ] && [ "$(id -u)" != 0 ]; then
  cat >&2 <<'EOF'
make test: needs root and was run as an ordinary user.
  Every tier runs here: the privileged tests create network namespaces and
  iptables rules, and the cluster tier runs a kubelet and containerd. Without
  root those tests would be skipped and a green run would prove nothing.
  Run it as root:            sudo make test
  or only the no-root tier:  make test-unit
EOF
  exit 1
fi

missing=()
for p in "${pkgs[@]}"; do
  # Installed means dpkg's status says so (a package removed but not purged
  # stays listed with another status).
  if [ "$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null)" != installed ]; then
    missing+=("$p")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
  echo "ensure-deps: missing Debian packages: ${missing[*]}; install them as root:" >&2
  echo "  apt-get update && apt-get install -y --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
echo "ensure-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
# Try with the package lists the machine has; refresh them only if that fails.
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
  { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}"; } ||
  { echo "ensure-deps: could not install ${missing[*]}" >&2; exit 1; }
