#!/usr/bin/env bash
# bench/echo/run.sh — gpusock-echo against its two baselines, same client, same run:
#   cpu-uring : echo-uring-server (plain host io_uring, multishot accept/recv, buffer ring)
#   launch    : echo-launch-server (host receives, copies to the GPU, launches, copies back,
#               sends; CUDA only, skipped without a GPU)
#   gpusock   : examples/echo's kernel server (polls through the host)
#   gpusock-devpoll : the same server with --poll device (polls on the device, docs 12.9a)
# For each message size and connection count every server gets the same gpusock-echo-bench
# run. Prints a table with req/s and p50 and the ratios the targets are stated in
# (gpusock req/s / cpu-uring req/s, gpusock p50 / launch p50), and writes every result as
# JSON lines plus the table to OUT.
#
#   bench/echo/run.sh [--bin DIR] [--out DIR] [--device cpu|cuda] [--duration S]
#                     [--sizes "64 1024"] [--conns "1 64 256"] [--depth D]
#                     [--host-threads N] [--blocks N] [--conns-per-warp N] [--servers "..."]
#                     [--gpu-extra "gpusock-echo options"]
#
# --bin: the build folder holding the binaries (default build/default). --host-threads:
# threads the servers' host side may use (gpusock service threads, baseline threads).
set -uo pipefail
bin=build/default out=bench-echo-out device="" duration=3 sizes="64 1024" conns="1 64 256" depth=1
threads=1 blocks="" cpw="" only="" extra=""
while [ $# -gt 0 ]; do
  case $1 in
    --bin) bin=$2 ;; --out) out=$2 ;; --device) device=$2 ;; --duration) duration=$2 ;;
    --sizes) sizes=$2 ;; --conns) conns=$2 ;; --depth) depth=$2 ;; --host-threads) threads=$2 ;;
    --blocks) blocks=$2 ;; --conns-per-warp) cpw=$2 ;; --servers) only=$2 ;; --gpu-extra) extra=$2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift 2
done
find_bin() { find "$bin" -type f -name "$1" -perm -u+x 2>/dev/null | head -1; }
echo_srv=$(find_bin gpusock-echo) load=$(find_bin gpusock-echo-bench)
uring=$(find_bin echo-uring-server) launch=$(find_bin echo-launch-server)
[ -n "$echo_srv" ] && [ -n "$load" ] && [ -n "$uring" ] || { echo "binaries not found under $bin" >&2; exit 1; }
mkdir -p "$out"
results=$out/results.jsonl
: >"$results"
port=$((21000 + RANDOM % 20000))
pid=""
cleanup() { [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; }
trap cleanup EXIT

# start NAME CMD...: runs a server on $port, waits for "listening on".
start() {
  local name=$1; shift
  port=$((port + 1))
  "$@" --port "$port" >"$out/$name.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do
    grep -q "listening on" "$out/$name.log" && return 0
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.05
  done
  echo "$name did not start:" >&2; cat "$out/$name.log" >&2
  kill -9 "$pid" 2>/dev/null; pid=""
  return 1
}
stop() { kill -INT "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; pid=""; }

gpu_args=(--service-threads "$threads")
[ -n "$device" ] && gpu_args+=(--device "$device")
[ -n "$blocks" ] && gpu_args+=(--blocks "$blocks")
[ -n "$cpw" ] && gpu_args+=(--conns-per-warp "$cpw")
# shellcheck disable=SC2206
[ -n "$extra" ] && gpu_args+=($extra)

run_load() {  # name size conns
  local tag="$1-$2B-$3c"
  "$load" --port "$port" --connections "$3" --size "$2" --depth "$depth" --duration "$duration" --warmup 1 \
    --label "$tag" --json "$out/$tag.json" | tee -a "$out/load.log"
  [ -f "$out/$tag.json" ] && cat "$out/$tag.json" >>"$results"
}

for size in $sizes; do
  servers="cpu-uring gpusock gpusock-devpoll"
  [ -n "$launch" ] && [ "$device" != cpu ] && servers="cpu-uring launch gpusock gpusock-devpoll"
  [ -n "$only" ] && servers=$only
  for s in $servers; do
    case $s in
      cpu-uring) start "$s-$size" "$uring" --threads "$threads" --size "$size" || continue ;;
      launch) start "$s-$size" "$launch" --threads "$threads" || continue ;;
      gpusock) start "$s-$size" "$echo_srv" "${gpu_args[@]}" || continue ;;
      gpusock-devpoll) start "$s-$size" "$echo_srv" "${gpu_args[@]}" --poll device || continue ;;
    esac
    for c in $conns; do run_load "$s" "$size" "$c"; done
    stop
  done
done

# The table: one row per (size, connections).
field() { grep -o "\"$2\":[0-9.]*" "$1" 2>/dev/null | cut -d: -f2; }
{
  echo "| size | conns | cpu-uring req/s | launch req/s | gpusock req/s | gpusock/cpu-uring req/s | device-poll req/s | cpu-uring p50 us | launch p50 us | gpusock p50 us | device-poll p50 us | gpusock/launch p50 | errors |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
  for size in $sizes; do
    for c in $conns; do
      u=$out/cpu-uring-${size}B-${c}c.json l=$out/launch-${size}B-${c}c.json g=$out/gpusock-${size}B-${c}c.json
      h=$out/gpusock-devpoll-${size}B-${c}c.json
      ur=$(field "$u" req_per_s) lr=$(field "$l" req_per_s) gr=$(field "$g" req_per_s) hr=$(field "$h" req_per_s)
      up=$(field "$u" p50_us) lp=$(field "$l" p50_us) gp=$(field "$g" p50_us) hp=$(field "$h" p50_us)
      errs=0
      for f in "$u" "$g" "$h" "$l"; do [ -f "$f" ] && errs=$((errs + $(field "$f" errors || echo 0))); done
      ratio() { [ -n "$1" ] && [ -n "$2" ] && awk -v a="$1" -v b="$2" 'BEGIN{ if (b > 0) printf "%.2f", a / b; else print "-" }' || echo "-"; }
      echo "| $size | $c | ${ur:--} | ${lr:--} | ${gr:--} | $(ratio "$gr" "$ur") | ${hr:--} | ${up:--} | ${lp:--} | ${gp:--} | ${hp:--} | $(ratio "$gp" "$lp") | $errs |"
    done
  done
} | tee "$out/table.md"
