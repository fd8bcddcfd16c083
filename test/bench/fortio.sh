#!/usr/bin/env bash
# fortio load harness (docs/design.md section 8): client sidecar → server sidecar
# in two network namespaces with meshlet's real capture rules and agents
# running as UID 1337, measured in the same run against direct (no proxy),
# haproxy (1 thread) and nginx (1 worker, upstream keep-alive).
#   1. L4: default config (pure passthrough) vs haproxy L4 and nginx L7.
#   2. Hot restart: RESTARTS reloads under load; any failed request or failed
#      reload fails the run (exit 1, after the report is written).
#   3. L7: the agents reload with an `l7:` config (ports declared http/grpc,
#      a service routing the server's address to a cluster) and HTTP/1.1 and
#      gRPC (fortio grpc ping) are measured vs direct, nginx and haproxy.
# Writes a markdown report (default docs/benchmarks.md). Needs root, jq,
# haproxy, nginx-light (installed with apt-get when missing); fortio is
# installed into a cache dir on first use.
# Cleans up its network namespaces and processes on any exit. Exits non-zero
# when anything measured failed (a fortio run that failed or saw errors, a
# failed reload or request in the hot-restart soak), so `make bench` never
# reports success over errors; the report says what failed.
#
#   sudo flock /tmp/meshlet-bench.lock test/bench/fortio.sh       # full run (~7 min)
#   QPS=1000 CONNS=16 DUR=10s RESTARTS=100 OUT=/tmp/b.md test/bench/fortio.sh
#   ONLY='^grpc-' RESTARTS=0 OUT=/tmp/b.md test/bench/fortio.sh  # only paths matching ONLY
#   SIDECAR_GOMAXPROCS=1 …   # the sidecars' GOMAXPROCS (default: Go's, the CPUs allowed)
#   MESHLET=/tmp/meshlet …   # run this meshlet binary instead of building one (profiling)
set -euo pipefail
cd "$(dirname "$0")/../.."

QPS=${QPS:-1000}
CONNS=${CONNS:-16}
DUR=${DUR:-10s}
MAXDUR=${MAXDUR:-8s}
PAYLOAD=${PAYLOAD:-1024}
RESTARTS=${RESTARTS:-100}
OUT=${OUT:-docs/benchmarks.md}
FORTIO_VERSION=v1.63.0
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/meshlet/fortio

if [ "$(id -u)" != 0 ]; then
  echo "fortio bench: needs root (network namespaces, iptables): run it as root (sudo make bench)" >&2
  exit 1
fi

# FAILURES collects what went wrong; the run goes on (the report is still
# written, saying so) and exits 1 at the end.
FAILURES=()
fail() { FAILURES+=("$*"); echo "fortio bench: FAIL: $*" >&2; }

# One measurement at a time on the shared cores: take /tmp/meshlet-bench.lock
# unless an ancestor (e.g. `flock /tmp/meshlet-bench.lock make bench`) holds it.
LOCK=/tmp/meshlet-bench.lock
lock_held_by_ancestor() {
  local ino holder p
  ino=$(stat -c %i "$LOCK" 2>/dev/null) || return 1
  holder=$(awk -v i=":$ino\$" '$2 == "FLOCK" && $4 == "WRITE" && $6 ~ i {print $5}' /proc/locks)
  [ -n "$holder" ] || return 1
  p=$$
  while [ "$p" -gt 1 ]; do
    for h in $holder; do [ "$h" = "$p" ] && return 0; done
    p=$(awk '{print $4}' "/proc/$p/stat" 2>/dev/null) || return 1
  done
  return 1
}
if ! lock_held_by_ancestor; then
  exec 9>>"$LOCK"
  echo "waiting for $LOCK" >&2
  flock 9
fi
# The reference proxies and tools come from Debian's packages (installed on
# first use, as fortio is below).
declare -A pkg_of=([jq]=jq [haproxy]=haproxy [nginx]=nginx-light [setpriv]=util-linux [ip]=iproute2)
missing=()
for t in "${!pkg_of[@]}"; do command -v "$t" >/dev/null || missing+=("${pkg_of[$t]}"); done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null; } ||
    { echo "fortio bench: cannot install ${missing[*]}" >&2; exit 1; }
  # The packages' own services are not wanted (they would hold ports 80).
  systemctl disable --now nginx haproxy >/dev/null 2>&1 || true
  pkill -x nginx 2>/dev/null || true
  pkill -x haproxy 2>/dev/null || true
fi
for t in "${!pkg_of[@]}"; do
  command -v "$t" >/dev/null || { echo "fortio bench: missing $t" >&2; exit 1; }
done
FORTIO=$CACHE/bin/fortio
if [ ! -x "$FORTIO" ]; then
  echo "installing fortio $FORTIO_VERSION into $CACHE/bin" >&2
  (cd /tmp && GOBIN=$CACHE/bin GOFLAGS=-mod=mod go install fortio.org/fortio@$FORTIO_VERSION)
fi

WORK=$(mktemp -d /tmp/mlpx-bench.XXXXXX)
chmod 755 "$WORK"
C=mlpx-bc-$$
S=mlpx-bs-$$
PIDS=()
# del_netns NS: kill what still runs in NS (e.g. proxy generations), then delete it.
del_netns() {
  local p
  for p in $(ip netns pids "$1" 2>/dev/null); do kill -9 "$p" 2>/dev/null || true; done
  ip netns del "$1" 2>/dev/null || true
}
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  del_netns "$C"
  del_netns "$S"
  if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
# Namespaces left by an earlier run that was killed (we hold the lock, so
# no other run is live; the suffix is that run's PID).
for ns in $(ip netns list | awk '{print $1}' | grep -E '^mlpx-b[cs]-[0-9]+$' || true); do
  kill -0 "${ns##*-}" 2>/dev/null || del_netns "$ns"
done

if [ -n "${MESHLET:-}" ]; then # e.g. a build with symbols, for perf
  cp "$MESHLET" "$WORK/meshlet"
else
  echo "building meshlet (as the image ships it: static, stripped)" >&2
  CGO_ENABLED=0 go build -trimpath -ldflags '-s -w' -o "$WORK/meshlet" ./cmd/meshlet
fi
M=$WORK/meshlet

# Network: client 10.212.100.1, server 10.212.100.2 (sidecar on both ends)
# and 10.212.100.3 (excluded from the client's capture: one sidecar hop).
ip netns add "$C"
ip netns add "$S"
ip link add bc0 netns "$C" type veth peer name bs0 netns "$S"
ip -n "$C" addr add 10.212.100.1/24 dev bc0
ip -n "$S" addr add 10.212.100.2/24 dev bs0
ip -n "$S" addr add 10.212.100.3/24 dev bs0
for ns in "$C" "$S"; do ip -n "$ns" link set lo up; done
ip -n "$C" link set bc0 up
ip -n "$S" link set bs0 up

# Ports. Behind the sidecars: fortio HTTP 8080, gRPC 8079. Never captured:
# direct fortio HTTP 8081 / gRPC 8085; haproxy L4 8082, HTTP 8084, gRPC 8087;
# nginx HTTP 8083, gRPC 8086.
NOCAP=8081,8082,8083,8084,8085,8086,8087
ip netns exec "$C" "$M" init -o $NOCAP -x 10.212.100.3/32 --ipv6 off >/dev/null
ip netns exec "$S" "$M" init -d 22,15090,15021,15020,$NOCAP --ipv6 off >/dev/null

# Servers (server netns): fortio HTTP+gRPC behind the sidecar and direct.
for ports in 8080:8079 8081:8085; do
  ip netns exec "$S" "$FORTIO" server -http-port "${ports%:*}" -grpc-port "${ports#*:}" -redirect-port disabled \
    -tcp-port disabled -udp-port disabled -loglevel Warning >"$WORK/fortio-${ports%:*}.log" 2>&1 &
  PIDS+=($!)
done
cat >"$WORK/haproxy.cfg" <<CFG
global
  nbthread 1
defaults
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen l4
  mode tcp
  bind 10.212.100.2:8082
  server s 127.0.0.1:8081
listen h1
  mode http
  http-reuse always
  bind 10.212.100.2:8084
  server s 127.0.0.1:8081
listen grpc
  mode http
  http-reuse always
  bind 10.212.100.2:8087 proto h2
  server s 127.0.0.1:8085 proto h2
CFG
ip netns exec "$S" haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 &
PIDS+=($!)
cat >"$WORK/nginx.conf" <<CFG
worker_processes 1;
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000; # defaults (1000) would close client connections mid-run
  client_body_temp_path $WORK/nginx-body;
  proxy_temp_path $WORK/nginx-proxy;
  upstream fortio { server 127.0.0.1:8081; keepalive 64; keepalive_requests 1000000; }
  upstream fortiogrpc { server 127.0.0.1:8085; keepalive 64; keepalive_requests 1000000; }
  server {
    listen 10.212.100.2:8083;
    location / { proxy_pass http://fortio; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
  server {
    listen 10.212.100.2:8086 http2;
    location / { grpc_pass grpc://fortiogrpc; }
  }
}
CFG
ip netns exec "$S" nginx -c "$WORK/nginx.conf" -g 'daemon off;' >"$WORK/nginx.log" 2>&1 &
PIDS+=($!)

# Sidecars: `meshlet agent` as UID/GID 1337 in both namespaces.
mkdir -m 755 "$WORK/config" # the agent watches this directory
cat >"$WORK/config/proxy.yaml" <<CFG
apiVersion: meshlet.io/v1alpha1
kind: ProxyConfig
CFG
chmod 644 "$WORK/config/proxy.yaml"
for ns in "$C" "$S"; do
  ip netns exec "$ns" setpriv --reuid 1337 --regid 1337 --clear-groups \
    env ${SIDECAR_GOMAXPROCS:+GOMAXPROCS=$SIDECAR_GOMAXPROCS} "$M" agent --config "$WORK/config/proxy.yaml" \
    >"$WORK/agent-$ns.log" 2>&1 &
  PIDS+=($!)
done
for ns in "$C" "$S"; do
  for i in $(seq 100); do
    ip netns exec "$ns" curl -sf -o /dev/null http://127.0.0.1:15020/healthz/ready && break
    sleep 0.1
  done
done
sleep 0.5

# procs NS COMM: pids of COMM in NS.
procs() { for p in $(ip netns pids "$1"); do [ "$(cat /proc/$p/comm 2>/dev/null)" = "$2" ] && echo "$p"; done; true; }
# cpu_ticks PIDS...: user+system clock ticks.
cpu_ticks() { local t=0; for p in "$@"; do set -- $(awk '{print $14, $15}' /proc/$p/stat 2>/dev/null || echo 0 0); t=$((t + $1 + $2)); done; echo $t; }
# rss_kb FIELD PIDS...: sum of a /proc/PID/status field (VmRSS, RssAnon) in KiB.
rss_kb() { local f=$1 t=0; shift; for p in "$@"; do t=$((t + $(awk -v f="$f:" '$1 == f {print $2}' /proc/$p/status 2>/dev/null || echo 0))); done; echo $t; }
# is_generation PID: a `meshlet proxy` process (not the agent).
is_generation() { [ "$(tr '\0' '\n' </proc/$1/cmdline 2>/dev/null | sed -n 2p)" = proxy ]; }
HZ=$(getconf CLK_TCK)
# host_busy: busy clock ticks of the whole machine (all CPUs, from /proc/stat).
host_busy() { awk '$1 == "cpu" {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }


# Paths: NAME → fortio target and kind (http: POST /echo; grpc: ping).
declare -A URL KIND
path() { URL[$1]=$2; KIND[$1]=$3; }
path direct http://10.212.100.2:8081/echo http
path haproxy-l4 http://10.212.100.2:8082/echo http
path nginx-l7 http://10.212.100.2:8083/echo http
path meshlet-1hop http://10.212.100.3:8080/echo http
path meshlet-2hop http://10.212.100.2:8080/echo http
path h1-direct http://10.212.100.2:8081/echo http
path h1-nginx http://10.212.100.2:8083/echo http
path h1-haproxy http://10.212.100.2:8084/echo http
path h1-meshlet-l7-1hop http://10.212.100.3:8080/echo http
path h1-meshlet-l7-2hop http://10.212.100.2:8080/echo http
path grpc-direct 10.212.100.2:8085 grpc
path grpc-nginx 10.212.100.2:8086 grpc
path grpc-haproxy 10.212.100.2:8087 grpc
path grpc-meshlet-l7-1hop 10.212.100.3:8079 grpc
path grpc-meshlet-l7-2hop 10.212.100.2:8079 grpc
L4_PATHS=(direct haproxy-l4 nginx-l7 meshlet-1hop meshlet-2hop)
H1_PATHS=(h1-direct h1-nginx h1-haproxy h1-meshlet-l7-1hop h1-meshlet-l7-2hop)
GRPC_PATHS=(grpc-direct grpc-nginx grpc-haproxy grpc-meshlet-l7-1hop grpc-meshlet-l7-2hop)
# Processes whose CPU is charged to each path.
proxy_pids() {
  case $1 in
    *haproxy*) procs "$S" haproxy ;;
    *nginx*) procs "$S" nginx ;;
    *meshlet*1hop) procs "$S" meshlet ;;
    *meshlet*2hop) procs "$S" meshlet; procs "$C" meshlet ;;
  esac
}
# The gRPC payload: PAYLOAD printable bytes (fortio's random -payload-size
# loses its non-UTF-8 bytes in a protobuf string, so it would be shorter).
GRPC_PAYLOAD=$(head -c "$PAYLOAD" /dev/zero | tr '\0' x)
load() { # NAME QPS DURATION
  if [ "${KIND[$1]}" = grpc ]; then
    ip netns exec "$C" "$FORTIO" load -grpc -ping -qps "$2" -c "$CONNS" -t "$3" -payload "$GRPC_PAYLOAD" \
      -json "$WORK/$1-$2.json" -quiet "${URL[$1]}" >"$WORK/$1-$2.log" 2>&1
  else
    ip netns exec "$C" "$FORTIO" load -qps "$2" -c "$CONNS" -t "$3" -payload-size "$PAYLOAD" \
      -json "$WORK/$1-$2.json" -quiet "${URL[$1]}" >"$WORK/$1-$2.log" 2>&1
  fi
}
pct() { jq -r --argjson p "$2" '[.DurationHistogram.Percentiles[] | select(.Percentile == $p) | .Value][0] * 1000' "$1"; }
# smaps_kb FIELD PIDS...: sum of a /proc/PID/smaps_rollup field (Pss, Anonymous) in KiB.
smaps_kb() { local f=$1 t=0; shift; for p in "$@"; do t=$((t + $(awk -v f="$f:" '$1 == f {print $2}' /proc/$p/smaps_rollup 2>/dev/null || echo 0))); done; echo $t; }

declare -A P50 P90 P99 CPU RSS PSS ANON APSS MAXQ ERR HOST
measure() { # NAME
  local name=$1 pids t0 t1 h0 h1 s0 s1 f n ok mem
  if [ -n "${ONLY:-}" ] && ! [[ $name =~ $ONLY ]]; then # quick partial runs: skipped rows read 0
    P50[$name]=0; P90[$name]=0; P99[$name]=0; CPU[$name]=0; RSS[$name]=0; PSS[$name]=0; ANON[$name]=0; APSS[$name]=0; MAXQ[$name]=0; ERR[$name]=-; HOST[$name]=0
    return
  fi
  echo "run $name @ $QPS qps" >&2
  load "$name" 3000 2s || true # warm-up
  pids=$(proxy_pids "$name")
  t0=$(cpu_ticks $pids); h0=$(host_busy); s0=$(date +%s.%N)
  load "$name" "$QPS" "$DUR" || fail "fortio exited with $? for $name at $QPS qps (see $WORK/$name-$QPS.log)"
  t1=$(cpu_ticks $pids); h1=$(host_busy); s1=$(date +%s.%N)
  # Busy CPUs of the whole machine during the run: fortio + proxies, and
  # whatever else runs (other users' builds); a high value flags a noisy row.
  HOST[$name]=$(awk -v d=$((h1 - h0)) -v hz="$HZ" -v a="$s0" -v b="$s1" 'BEGIN { printf "%.2f", d / hz / (b - a) }')
  f=$WORK/$name-$QPS.json
  P50[$name]=$(pct "$f" 50); P90[$name]=$(pct "$f" 90); P99[$name]=$(pct "$f" 99)
  n=$(jq '.DurationHistogram.Count' "$f")
  ok=200; [ "${KIND[$name]}" = grpc ] && ok=SERVING
  ERR[$name]=$(jq --arg ok "$ok" '[.RetCodes | to_entries[] | select(.key != $ok) | .value] | add // 0' "$f")
  [ "${ERR[$name]}" = 0 ] || fail "$name: ${ERR[$name]} of $n requests at $QPS qps failed"
  CPU[$name]=$(awk -v d=$((t1 - t0)) -v hz="$HZ" -v n="$n" 'BEGIN { printf "%.3f", (d / hz) / (n / 1000) }')
  # Proxy memory: meshlet proxy generations (not agents); haproxy/nginx all processes.
  mem=$(for p in $pids; do case $name in *meshlet*) if is_generation "$p"; then echo "$p"; fi ;; *) echo "$p" ;; esac; done)
  RSS[$name]=$(rss_kb VmRSS $mem)
  PSS[$name]=$(smaps_kb Pss $mem)
  ANON[$name]=$(smaps_kb Anonymous $mem)
  # meshlet: the agents beside those generations (a sidecar is both).
  APSS[$name]=$(smaps_kb Pss $(for p in $pids; do case $name in *meshlet*) is_generation "$p" || echo "$p" ;; esac; done))
  echo "run $name max qps" >&2
  load "$name" 0 "$MAXDUR" || fail "fortio exited with $? for $name at max qps (see $WORK/$name-0.log)"
  MAXQ[$name]=$(jq '.ActualQPS | floor' "$WORK/$name-0.json")
}

for name in "${L4_PATHS[@]}"; do measure "$name"; done

# Hot restart: RESTARTS reloads, alternating server and client sidecar,
# under QPS load through both sidecars.
echo "hot restart: $RESTARTS reloads at $QPS qps" >&2
hr_secs=$((RESTARTS * 45 / 100 + 5))
ip netns exec "$C" "$FORTIO" load -qps "$QPS" -c "$CONNS" -t "${hr_secs}s" -payload-size "$PAYLOAD" \
  -json "$WORK/hotrestart.json" -quiet "${URL[meshlet-2hop]}" >"$WORK/hotrestart.log" 2>&1 &
fpid=$!
sleep 1
: >"$WORK/reload-times"
HR_RELOAD_FAIL=0
for i in $(seq "$RESTARTS"); do
  ns=$S; [ $((i % 2)) = 0 ] && ns=$C
  # POST /reload answers once the new generation serves, 500 with the reason
  # when it does not.
  if t=$(ip netns exec "$ns" curl -sS --fail-with-body -o "$WORK/reload.out" -w '%{time_total}' \
    -X POST http://127.0.0.1:15020/reload 2>"$WORK/reload.err"); then
    echo "$t" >>"$WORK/reload-times"
  else
    HR_RELOAD_FAIL=$((HR_RELOAD_FAIL + 1))
    echo "reload $i of the $ns sidecar failed: $(cat "$WORK/reload.err" "$WORK/reload.out" 2>/dev/null)" >&2
  fi
  sleep 0.3
done
wait $fpid || fail "fortio exited with $? during the hot-restart soak (see $WORK/hotrestart.log)"
HR_TOTAL=$(jq '.DurationHistogram.Count' "$WORK/hotrestart.json")
HR_OK=$(jq '.RetCodes["200"] // 0' "$WORK/hotrestart.json")
HR_FAIL=$((HR_TOTAL - HR_OK))
[ "$HR_FAIL" = 0 ] || fail "hot-restart soak: $HR_FAIL of $HR_TOTAL requests failed"
[ "$HR_RELOAD_FAIL" = 0 ] || fail "hot-restart soak: $HR_RELOAD_FAIL of $RESTARTS reloads failed"
[ "$HR_TOTAL" -gt 0 ] || fail "hot-restart soak: no request completed"
read -r HR_MED HR_P90 HR_MAX < <(sort -n "$WORK/reload-times" | awk '{a[NR]=$1} END {if (NR == 0) {print "- - -"; exit} printf "%.1f %.1f %.1f\n", a[int((NR+1)/2)]*1000, a[int(NR*0.9)]*1000, a[NR]*1000}')
GENS=$(ip netns exec "$S" curl -s http://127.0.0.1:15020/server_info | jq .activeGeneration)
GENC=$(ip netns exec "$C" curl -s http://127.0.0.1:15020/server_info | jq .activeGeneration)

# L7: both agents hot-restart into a config with L7 routing on. Ports 8080
# and 8079 are declared http and grpc; outbound requests to the server's
# address match a service whose route sends them to a cluster (the client
# sidecar routes; the server sidecar serves them as HTTP on its inbound
# side and forwards to the app from 127.0.0.6).
cat >"$WORK/proxy-l7.yaml" <<CFG
apiVersion: meshlet.io/v1alpha1
kind: ProxyConfig
l7:
  ports:
  - {port: 8080, name: http-fortio}
  - {port: 8079, name: grpc-fortio}
  services:
  - name: fortio-http
    hosts: [fortio]
    addresses: [10.212.100.2]
    ports: [{port: 8080, name: http-fortio}]
    routes:
    - name: echo
      match: [{uri: {prefix: /}}]
      destinations: [{cluster: fortio-http}]
  - name: fortio-grpc
    hosts: [fortio]
    addresses: [10.212.100.2]
    ports: [{port: 8079, name: grpc-fortio}]
    routes:
    - name: ping
      match: [{uri: {prefix: /}}]
      destinations: [{cluster: fortio-grpc}]
  clusters:
  - name: fortio-http
    protocol: http1
    endpoints: [{address: "10.212.100.2:8080"}]
  - name: fortio-grpc
    protocol: http2
    endpoints: [{address: "10.212.100.2:8079"}]
CFG
chmod 644 "$WORK/proxy-l7.yaml"
cp "$WORK/proxy-l7.yaml" "$WORK/config/.proxy.yaml.new"
mv "$WORK/config/.proxy.yaml.new" "$WORK/config/proxy.yaml" # atomic: the agents see one complete file
want=$(sha256sum "$WORK/config/proxy.yaml" | cut -d' ' -f1)
for ns in "$C" "$S"; do
  for i in $(seq 150); do
    info=$(ip netns exec "$ns" curl -s http://127.0.0.1:15020/server_info || true)
    if [ "$(jq -r '.configHash' <<<"$info")" = "$want" ] && [ "$(jq '.generations | length' <<<"$info")" = 1 ]; then
      break
    fi
    [ "$i" = 30 ] && ip netns exec "$ns" curl -s -o /dev/null -X POST http://127.0.0.1:15020/reload
    [ "$i" = 150 ] && { echo "the $ns sidecar did not switch to the L7 config: $info" >&2; exit 1; }
    sleep 0.1
  done
done
sleep 0.5
for name in "${H1_PATHS[@]}" "${GRPC_PATHS[@]}"; do measure "$name"; done
# Proof that L7 routing served the meshlet rows: request counters by route.
l7_requests() { # NS DIRECTION ROUTE
  ip netns exec "$1" curl -s http://127.0.0.1:15090/stats/prometheus |
    awk -v d="direction=\"$2\"" -v r="route=\"$3\"" '/^meshlet_l7_requests_total\{/ && index($0, d) && index($0, r) {s += $NF} END {printf "%d", s}'
}
L7_OUT_H1=$(l7_requests "$C" outbound fortio-http/echo)
L7_OUT_GRPC=$(l7_requests "$C" outbound fortio-grpc/ping)
L7_IN=$(l7_requests "$S" inbound inbound)
L7_PASS=$(l7_requests "$C" outbound passthrough)

mkdir -p "$(dirname "$OUT")"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2f", a / b }'; }
added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.3f", a - b }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
table() { # BASELINE PATHS...
  local base=$1 name cpu mem
  shift
  echo "| path | p50 ms | p90 ms | p99 ms | added p90 ms vs direct | CPU s / 1000 req | proxy RSS / PSS / anon MiB | max qps | max qps / direct | errors | host busy CPUs |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  for name in "$@"; do
    mem=-; cpu=-
    if [ "$name" != "$base" ]; then
      mem="$(mib "${RSS[$name]}") / $(mib "${PSS[$name]}") / $(mib "${ANON[$name]}")"
      cpu=${CPU[$name]}
    fi
    printf "| %s | %.3f | %.3f | %.3f | %s | %s | %s | %s | %s | %s | %s |\n" "$name" "${P50[$name]}" "${P90[$name]}" "${P99[$name]}" \
      "$(added "${P90[$name]}" "${P90[$base]}")" "$cpu" "$mem" "${MAXQ[$name]}" "$(ratio "${MAXQ[$name]}" "${MAXQ[$base]}")" "${ERR[$name]}" "${HOST[$name]}"
  done
}
# summary ROW...: the issue's table — for each row the meshlet, haproxy and
# nginx figure and whether meshlet is ahead of the best of them.
better() { # VALUE BEST LOWER(1: lower is better)
  awk -v v="$1" -v b="$2" -v l="$3" 'BEGIN { if (b == "" || b == "-") print "-"; else if ((l && v + 0 <= b + 0) || (!l && v + 0 >= b + 0)) print "ahead"; else print "behind" }'
}
best() { # LOWER VALUES...: the best of the values that are not "—"
  local l=$1 b=""
  shift
  for v in "$@"; do
    [ "$v" = — ] && continue
    if [ -z "$b" ] || awk -v v="$v" -v b="$b" -v l="$l" 'BEGIN { exit !((l && v + 0 < b + 0) || (!l && v + 0 > b + 0)) }'; then b=$v; fi
  done
  echo "$b"
}
srow() { # LABEL LOWER MESHLET HAPROXY NGINX
  local b
  b=$(best "$2" "$4" "$5")
  if [ "$3" = — ]; then
    echo "| $1 | — | $4 | $5 | - |"
  else
    echo "| $1 | $3 | $4 | $5 | $(better "$3" "$b" "$2") |"
  fi
}
# measured NAME VALUE: VALUE, or — when NAME was not measured (ONLY) or is not a
# peer of the row (empty NAME).
measured() { if [ -z "$1" ] || [ "${ERR[$1]}" = - ]; then echo —; else echo "$2"; fi; }
summary() {
  local n base m h x
  echo "| path | meshlet | haproxy | nginx | meshlet vs best peer |"
  echo "|---|---|---|---|---|"
  for row in "L4:direct:meshlet-1hop:haproxy-l4:" "HTTP/1.1 L7:h1-direct:h1-meshlet-l7-1hop:h1-haproxy:h1-nginx" \
    "gRPC L7:grpc-direct:grpc-meshlet-l7-1hop:grpc-haproxy:grpc-nginx"; do
    IFS=: read -r n base m h x <<<"$row"
    [ "${ERR[$base]}" = - ] && base=none # no direct run: no added latency or ratio
    local v=()
    for p in "$m" "$h" "$x"; do
      if [ "$base" = none ] || [ -z "$p" ]; then v+=(—); else v+=("$(measured "$p" "$(added "${P90[$p]}" "${P90[$base]}")")"); fi
    done
    srow "$n one hop, added p90 ms" 1 "${v[@]}"
    v=()
    for p in "$m" "$h" "$x"; do
      if [ "$base" = none ] || [ -z "$p" ]; then v+=(—); else v+=("$(measured "$p" "$(ratio "${MAXQ[$p]}" "${MAXQ[$base]}")")"); fi
    done
    srow "$n one hop, max qps / direct" 0 "${v[@]}"
    srow "$n one hop, CPU s per 1000 req" 1 "$(measured "$m" "${CPU[$m]}")" "$(measured "$h" "${CPU[$h]}")" "$([ -n "$x" ] && measured "$x" "${CPU[$x]}" || echo —)"
  done
  srow "L4 sidecar PSS MiB (meshlet: generation)" 1 "$(measured meshlet-1hop "$(mib "${PSS[meshlet-1hop]}")")" "$(measured haproxy-l4 "$(mib "${PSS[haproxy-l4]}")")" —
  srow "L7 sidecar PSS MiB (meshlet: generation)" 1 "$(measured h1-meshlet-l7-1hop "$(mib "${PSS[h1-meshlet-l7-1hop]}")")" \
    "$(measured h1-haproxy "$(mib "${PSS[h1-haproxy]}")")" "$(measured h1-nginx "$(mib "${PSS[h1-nginx]}")")"
  echo "| meshlet agent PSS MiB (beside the generation; L4 / L7) | $(measured meshlet-1hop "$(mib "${APSS[meshlet-1hop]}")") / $(measured h1-meshlet-l7-1hop "$(mib "${APSS[h1-meshlet-l7-1hop]}")") | — | — | - |"
  for row in "L4:direct:meshlet-1hop:meshlet-2hop" "HTTP/1.1 L7:h1-direct:h1-meshlet-l7-1hop:h1-meshlet-l7-2hop" \
    "gRPC L7:grpc-direct:grpc-meshlet-l7-1hop:grpc-meshlet-l7-2hop"; do
    IFS=: read -r n base m x <<<"$row"
    local one two r
    if [ "${ERR[$base]}" = - ] || [ "${ERR[$m]}" = - ] || [ "${ERR[$x]}" = - ]; then
      echo "| $n two hops added p90 ÷ one hop's (goal ≤ 1.6) | — | — | — | - |"
      continue
    fi
    one=$(awk -v a="${P90[$m]}" -v b="${P90[$base]}" 'BEGIN { print a - b }')
    two=$(awk -v a="${P90[$x]}" -v b="${P90[$base]}" 'BEGIN { print a - b }')
    # A one-hop figure within 0.05 ms of direct is below the run's noise: no ratio.
    if awk -v o="$one" 'BEGIN { exit !(o < 0.05) }'; then
      r=—
    else
      r=$(ratio "$two" "$one")
    fi
    echo "| $n two hops added p90 ÷ one hop's (goal ≤ 1.6) | $r ($(added "$two" 0) / $(added "$one" 0) ms) | — | — | $(awk -v r="$r" 'BEGIN { if (r == "-" || r == "—") print "- (one hop within noise)"; else if (r + 0 <= 1.6) print "met"; else print "not met" }') |"
  done
}
GMP_NOTE="GOMAXPROCS=${SIDECAR_GOMAXPROCS:-} (agent and generations)"
[ -n "${SIDECAR_GOMAXPROCS:-}" ] || GMP_NOTE="with Go's default GOMAXPROCS (the CPUs allowed: $(nproc))"
{
  echo "<!-- Generated by test/bench/fortio.sh (make bench) down to the matching end marker; edit the script, not this part. -->"
  echo "## Data plane: fortio load through the sidecars (\`make bench\`)"
  echo
  echo "Generated by \`test/bench/fortio.sh\` (\`make bench\`) on $(date -u +%Y-%m-%d) — $(nproc) cores,"
  echo "fortio $FORTIO_VERSION, $QPS qps, $CONNS keep-alive connections, ${PAYLOAD}-byte payload both ways"
  echo "(HTTP: POST /echo; gRPC: fortio's ping with a ${PAYLOAD}-byte string), $DUR per latency run,"
  echo "$MAXDUR per max-throughput run (qps 0). Client and server fortio in two network namespaces joined by"
  echo "veth; meshlet's real capture rules; \`meshlet agent\` as UID 1337. haproxy $(haproxy -v | head -1 | awk '{print $3}') (1 thread) and"
  echo "nginx $(nginx -v 2>&1 | sed 's|.*/||') (1 worker, upstream keep-alive) run in the server namespace, one hop."
  echo "One run, same machine, same moment: compare the ratios, not the absolute numbers."
  echo "Threads: haproxy nbthread 1, nginx worker_processes 1, meshlet sidecars $GMP_NOTE."
  echo
  echo "### Summary"
  echo
  echo "Lower is better except max qps; \"ahead\" means at least as good as the best peer of the row."
  echo
  summary
  echo
  echo "Proxy memory is summed over the proxy processes after the ${QPS} qps run (meshlet: proxy generations, not"
  echo "agents): VmRSS / PSS (shared pages divided among the processes mapping them) / anonymous (private heap"
  echo "and stacks). meshlet's RSS is mostly file pages of the one $(du -m "$M" | cut -f1) MB binary (every subcommand's"
  echo "packages), shared by agent and generations — PSS and anon are the cost a sidecar adds."
  echo "2hop rows sum both sidecars (CPU: agents + generations); 1hop: only the server sidecar"
  echo "(the client's capture excludes 10.212.100.3). errors: non-200 / non-SERVING results and socket errors."
  echo "host busy CPUs: all CPU time used on the machine during the $QPS qps run ÷ its duration (of $(nproc)) —"
  echo "fortio and proxies need well under one; a row with much more ran beside someone else's work and is noisy."
  echo
  echo "### L4 (default config: pure passthrough)"
  echo
  table direct "${L4_PATHS[@]}"
  echo
  echo "- meshlet-2hop: client sidecar (outbound 15001) → server sidecar (inbound 15006 → 127.0.0.6 → app)."
  echo "- haproxy-l4: mode tcp; nginx-l7: proxy_pass with upstream keep-alive."
  echo "- Two meshlet hops add $(added "${P90[meshlet-2hop]}" "${P90[direct]}") ms p90; one haproxy L4 hop adds $(added "${P90[haproxy-l4]}" "${P90[direct]}") ms;"
  echo "  one meshlet hop keeps $(ratio "${MAXQ[meshlet-1hop]}" "${MAXQ[direct]}") of direct max qps (haproxy L4: $(ratio "${MAXQ[haproxy-l4]}" "${MAXQ[direct]}"), nginx L7: $(ratio "${MAXQ[nginx-l7]}" "${MAXQ[direct]}"))."
  echo
  echo "### L7 (\`l7:\` config: routing on)"
  echo
  echo "Both agents hot-restart into this config (the same file for both sidecars):"
  echo
  echo '```yaml'
  cat "$WORK/proxy-l7.yaml"
  echo '```'
  echo
  echo "The client sidecar parses each request, matches service and route and sends it to the"
  echo "cluster's pooled upstream connections (HTTP/1.1 keep-alive; gRPC over one h2c connection"
  echo "per endpoint); the server sidecar serves the declared port as HTTP on its inbound side and"
  echo "forwards to the app. Requests counted by the sidecars during these runs: client outbound"
  echo "route fortio-http/echo $L7_OUT_H1, fortio-grpc/ping $L7_OUT_GRPC, passthrough $L7_PASS; server inbound $L7_IN."
  echo
  echo "#### HTTP/1.1"
  echo
  table h1-direct "${H1_PATHS[@]}"
  echo
  echo "- h1-nginx: proxy_pass, upstream keep-alive; h1-haproxy: mode http, http-reuse always."
  echo
  echo "#### gRPC (fortio grpc ping, h2c)"
  echo
  table grpc-direct "${GRPC_PATHS[@]}"
  echo
  echo "- grpc-nginx: \`listen … http2\` (h2c) + grpc_pass with upstream keep-alive; grpc-haproxy: mode http,"
  echo "  \`bind … proto h2\`, \`server … proto h2\`."
  echo
  echo "Goals (issue 6): two L7 hops add < 0.7 ms p90 at $QPS qps — HTTP/1.1 $(added "${P90[h1-meshlet-l7-2hop]}" "${P90[h1-direct]}") ms,"
  echo "gRPC $(added "${P90[grpc-meshlet-l7-2hop]}" "${P90[grpc-direct]}") ms (one nginx hop: $(added "${P90[h1-nginx]}" "${P90[h1-direct]}") / $(added "${P90[grpc-nginx]}" "${P90[grpc-direct]}") ms);"
  echo "throughput at least nginx's — one meshlet L7 hop / nginx max qps: HTTP/1.1 $(ratio "${MAXQ[h1-meshlet-l7-1hop]}" "${MAXQ[h1-nginx]}"),"
  echo "gRPC $(ratio "${MAXQ[grpc-meshlet-l7-1hop]}" "${MAXQ[grpc-nginx]}"); two hops / nginx: $(ratio "${MAXQ[h1-meshlet-l7-2hop]}" "${MAXQ[h1-nginx]}"), $(ratio "${MAXQ[grpc-meshlet-l7-2hop]}" "${MAXQ[grpc-nginx]}")."
  echo
  echo "### Hot restart"
  echo
  echo "$RESTARTS reloads (POST /reload, alternating server and client sidecar, 0.3 s apart) during"
  echo "${hr_secs} s of $QPS qps through both sidecars (L4 config, before the L7 section):"
  echo
  echo "| requests | failed (non-200 or socket error) | failed reloads | reload → new generation serving: median / p90 / max ms | final generations (server, client) |"
  echo "|---|---|---|---|---|"
  echo "| $HR_TOTAL | $HR_FAIL | $HR_RELOAD_FAIL | $HR_MED / $HR_P90 / $HR_MAX | $GENS, $GENC |"
  if [ ${#FAILURES[@]} -gt 0 ]; then
    echo
    echo "### FAILED"
    echo
    echo "This run saw errors; its numbers are not a valid measurement:"
    echo
    for f in "${FAILURES[@]}"; do echo "- $f"; done
  fi
  echo "<!-- End of the part generated by test/bench/fortio.sh. -->"
} >"$WORK/section.md"
# The generated part replaces the one between the markers in OUT and nothing
# else (the rest of docs/benchmarks.md is other benchmarks' write-ups); a new
# OUT gets a title, an OUT without the markers the part appended.
if [ -f "$OUT" ] && grep -q '^<!-- Generated by test/bench/fortio.sh' "$OUT" && grep -q '^<!-- End of the part generated by test/bench/fortio.sh' "$OUT"; then
  awk -v sec="$WORK/section.md" '
    /^<!-- Generated by test\/bench\/fortio.sh/ { while ((getline l < sec) > 0) print l; skip = 1; next }
    skip && /^<!-- End of the part generated by test\/bench\/fortio.sh/ { skip = 0; next }
    !skip' "$OUT" >"$OUT.tmp"
elif [ -f "$OUT" ]; then
  { cat "$OUT"; echo; cat "$WORK/section.md"; } >"$OUT.tmp"
else
  { echo "# meshlet benchmarks"; echo; cat "$WORK/section.md"; } >"$OUT.tmp"
fi
mv "$OUT.tmp" "$OUT"
cat "$WORK/section.md"
if [ ${#FAILURES[@]} -gt 0 ]; then
  echo "fortio bench: FAILED (${#FAILURES[@]} problems, listed above and in $OUT)" >&2
  exit 1
fi
