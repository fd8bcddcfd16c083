#!/usr/bin/env bash
# fortio load harness (DESIGN.md section 8): client sidecar → server sidecar
# in two network namespaces with meshlet's real capture rules and agents
# running as UID 1337, measured in the same run against direct (no proxy),
# haproxy (L4, 1 thread) and nginx (L7, 1 worker, upstream keep-alive).
# Writes a markdown report (default docs/benchmarks.md). Needs root, jq,
# haproxy, nginx-light; fortio is installed into a cache dir on first use.
#
#   sudo test/bench/fortio.sh                  # full run
#   QPS=1000 CONNS=16 DUR=10s RESTARTS=100 OUT=/tmp/b.md test/bench/fortio.sh
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
  echo "fortio bench: skipped: needs root (network namespaces, iptables)" >&2
  exit 0
fi
for t in jq haproxy nginx setpriv ip; do
  command -v $t >/dev/null || { echo "fortio bench: missing $t" >&2; exit 1; }
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
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  sleep 0.3
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid")" 2>/dev/null || true
  ip netns del "$C" 2>/dev/null || true
  ip netns del "$S" 2>/dev/null || true
  if [ -n "${KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

echo "building meshlet" >&2
go build -o "$WORK/meshlet" ./cmd/meshlet
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

# Capture: 8081 (direct), 8082 (haproxy), 8083 (nginx) are never captured.
ip netns exec "$C" "$M" init -o 8081,8082,8083 -x 10.212.100.3/32 --ipv6 off >/dev/null
ip netns exec "$S" "$M" init -d 22,15090,15021,15020,8081,8082,8083 --ipv6 off >/dev/null

# Servers (server netns): fortio on 8080 (behind the sidecar) and 8081.
for port in 8080 8081; do
  ip netns exec "$S" "$FORTIO" server -http-port $port -grpc-port disabled -redirect-port disabled \
    -tcp-port disabled -udp-port disabled -loglevel Warning >"$WORK/fortio-$port.log" 2>&1 &
  PIDS+=($!)
done
cat >"$WORK/haproxy.cfg" <<CFG
global
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen l4
  bind 10.212.100.2:8082
  server s 127.0.0.1:8081
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
  client_body_temp_path $WORK/nginx-body;
  proxy_temp_path $WORK/nginx-proxy;
  upstream fortio { server 127.0.0.1:8081; keepalive 64; }
  server {
    listen 10.212.100.2:8083;
    location / { proxy_pass http://fortio; proxy_http_version 1.1; proxy_set_header Connection ""; }
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
  ip netns exec "$ns" setpriv --reuid 1337 --regid 1337 --clear-groups "$M" agent --config "$WORK/config/proxy.yaml" \
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

declare -A URL=(
  [direct]=http://10.212.100.2:8081/echo
  [haproxy-l4]=http://10.212.100.2:8082/echo
  [nginx-l7]=http://10.212.100.2:8083/echo
  [meshlet-1hop]=http://10.212.100.3:8080/echo
  [meshlet-2hop]=http://10.212.100.2:8080/echo
)
# Processes whose CPU is charged to each path.
proxy_pids() {
  case $1 in
    haproxy-l4) procs "$S" haproxy ;;
    nginx-l7) procs "$S" nginx ;;
    meshlet-1hop) procs "$S" meshlet ;;
    meshlet-2hop) procs "$S" meshlet; procs "$C" meshlet ;;
  esac
}
PATHS=(direct haproxy-l4 nginx-l7 meshlet-1hop meshlet-2hop)
load() { # NAME QPS DURATION
  ip netns exec "$C" "$FORTIO" load -qps "$2" -c "$CONNS" -t "$3" -payload-size "$PAYLOAD" \
    -json "$WORK/$1-$2.json" -quiet "${URL[$1]}" >"$WORK/$1-$2.log" 2>&1
}
pct() { jq -r --argjson p "$2" '[.DurationHistogram.Percentiles[] | select(.Percentile == $p) | .Value][0] * 1000' "$1"; }

declare -A P50 P90 P99 CPU RSS ANON MAXQ ERR
for name in "${PATHS[@]}"; do
  echo "run $name @ $QPS qps" >&2
  load "$name" 3000 2s || true # warm-up
  pids=$(proxy_pids "$name")
  t0=$(cpu_ticks $pids)
  load "$name" "$QPS" "$DUR"
  t1=$(cpu_ticks $pids)
  f=$WORK/$name-$QPS.json
  P50[$name]=$(pct "$f" 50); P90[$name]=$(pct "$f" 90); P99[$name]=$(pct "$f" 99)
  n=$(jq '.DurationHistogram.Count' "$f")
  ERR[$name]=$(jq '[.RetCodes | to_entries[] | select(.key != "200") | .value] | add // 0' "$f")
  CPU[$name]=$(awk -v d=$((t1 - t0)) -v hz="$HZ" -v n="$n" 'BEGIN { printf "%.3f", (d / hz) / (n / 1000) }')
  # Proxy memory: meshlet proxy generations (not agents); haproxy/nginx all processes.
  mem=$(for p in $pids; do case $name in meshlet*) if is_generation "$p"; then echo "$p"; fi ;; *) echo "$p" ;; esac; done)
  RSS[$name]=$(rss_kb VmRSS $mem)
  ANON[$name]=$(rss_kb RssAnon $mem)
  echo "run $name max qps" >&2
  load "$name" 0 "$MAXDUR"
  MAXQ[$name]=$(jq '.ActualQPS | floor' "$WORK/$name-0.json")
done

# Hot restart: RESTARTS reloads, alternating server and client sidecar,
# under QPS load through both sidecars.
echo "hot restart: $RESTARTS reloads at $QPS qps" >&2
hr_secs=$((RESTARTS * 45 / 100 + 5))
ip netns exec "$C" "$FORTIO" load -qps "$QPS" -c "$CONNS" -t "${hr_secs}s" -payload-size "$PAYLOAD" \
  -json "$WORK/hotrestart.json" -quiet "${URL[meshlet-2hop]}" >"$WORK/hotrestart.log" 2>&1 &
fpid=$!
sleep 1
: >"$WORK/reload-times"
for i in $(seq "$RESTARTS"); do
  ns=$S; [ $((i % 2)) = 0 ] && ns=$C
  ip netns exec "$ns" curl -s -o /dev/null -w '%{time_total}\n' -X POST http://127.0.0.1:15020/reload >>"$WORK/reload-times" || true
  sleep 0.3
done
wait $fpid || echo "fortio exited with $? (see $WORK/hotrestart.log)" >&2
HR_TOTAL=$(jq '.DurationHistogram.Count' "$WORK/hotrestart.json")
HR_OK=$(jq '.RetCodes["200"] // 0' "$WORK/hotrestart.json")
HR_FAIL=$((HR_TOTAL - HR_OK))
read -r HR_MED HR_P90 HR_MAX < <(sort -n "$WORK/reload-times" | awk '{a[NR]=$1} END {printf "%.1f %.1f %.1f\n", a[int((NR+1)/2)]*1000, a[int(NR*0.9)]*1000, a[NR]*1000}')
GENS=$(ip netns exec "$S" curl -s http://127.0.0.1:15020/server_info | jq .activeGeneration)
GENC=$(ip netns exec "$C" curl -s http://127.0.0.1:15020/server_info | jq .activeGeneration)

mkdir -p "$(dirname "$OUT")"
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b == 0) print "-"; else printf "%.2f", a / b }'; }
added() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%+.3f", a - b }'; }
{
  echo "# meshlet benchmarks"
  echo
  echo "Generated by \`test/bench/fortio.sh\` (\`make bench\`) on $(date -u +%Y-%m-%d) — $(nproc) cores,"
  echo "fortio $FORTIO_VERSION, $QPS qps, $CONNS keep-alive connections, ${PAYLOAD}-byte payload both ways"
  echo "(POST /echo), $DUR per latency run, $MAXDUR per max-throughput run (qps 0). Client and server"
  echo "fortio in two network namespaces joined by veth; meshlet's real capture rules; \`meshlet agent\`"
  echo "as UID 1337 (default config: pure L4 passthrough). haproxy $(haproxy -v | head -1 | awk '{print $3}') (L4 tcp, 1 thread) and"
  echo "nginx $(nginx -v 2>&1 | sed 's|.*/||') (L7, 1 worker, upstream keep-alive) run in the server namespace, one hop."
  echo "One run, same machine, same moment: compare the ratios, not the absolute numbers."
  echo
  echo "| path | p50 ms | p90 ms | p99 ms | added p90 ms vs direct | CPU s / 1000 req | proxy RSS MiB (anon) | max qps | max qps / direct | non-200 |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  for name in "${PATHS[@]}"; do
    rss=-; [ "$name" != direct ] && rss=$(awk -v k="${RSS[$name]}" -v a="${ANON[$name]}" 'BEGIN { printf "%.1f (%.1f)", k / 1024, a / 1024 }')
    cpu=-; [ "$name" != direct ] && cpu=${CPU[$name]}
    printf "| %s | %.3f | %.3f | %.3f | %s | %s | %s | %s | %s | %s |\n" "$name" "${P50[$name]}" "${P90[$name]}" "${P99[$name]}" \
      "$(added "${P90[$name]}" "${P90[direct]}")" "$cpu" "$rss" "${MAXQ[$name]}" "$(ratio "${MAXQ[$name]}" "${MAXQ[direct]}")" "${ERR[$name]}"
  done
  echo
  echo "- meshlet-2hop: client sidecar (outbound 15001) → server sidecar (inbound 15006 → 127.0.0.6 → app);"
  echo "  its CPU and RSS are the sum of both sidecars (agents + proxy generations for CPU; proxy generations for RSS)."
  echo "- RSS is VmRSS after the 1000 qps run; in parentheses the private (anonymous) part. The rest is"
  echo "  file-backed pages of the one meshlet binary ($(du -m "$M" | cut -f1) MB, every subcommand's packages), shared with the agent."
  echo "- meshlet-1hop: only the server sidecar (the client's capture excludes 10.212.100.3)."
  echo "- Two meshlet hops add $(added "${P90[meshlet-2hop]}" "${P90[direct]}") ms p90; one haproxy L4 hop adds $(added "${P90[haproxy-l4]}" "${P90[direct]}") ms;"
  echo "  one meshlet hop keeps $(ratio "${MAXQ[meshlet-1hop]}" "${MAXQ[direct]}") of direct max qps (haproxy L4: $(ratio "${MAXQ[haproxy-l4]}" "${MAXQ[direct]}"), nginx L7: $(ratio "${MAXQ[nginx-l7]}" "${MAXQ[direct]}"))."
  echo "  CPU per 1000 rps, one meshlet hop: ${CPU[meshlet-1hop]} vCPU (haproxy ${CPU[haproxy-l4]}, nginx ${CPU[nginx-l7]})."
  echo
  echo "## Hot restart"
  echo
  echo "$RESTARTS reloads (POST /reload, alternating server and client sidecar, 0.3 s apart) during"
  echo "${hr_secs} s of $QPS qps through both sidecars:"
  echo
  echo "| requests | failed (non-200 or socket error) | reload → new generation serving: median / p90 / max ms | final generations (server, client) |"
  echo "|---|---|---|---|"
  echo "| $HR_TOTAL | $HR_FAIL | $HR_MED / $HR_P90 / $HR_MAX | $GENS, $GENC |"
} >"$OUT.tmp" && mv "$OUT.tmp" "$OUT"
cat "$OUT"
