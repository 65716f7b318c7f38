#!/usr/bin/env bash
# The echo example end to end: start gpusock-echo on DEVICE, drive it with
# gpusock-echo-bench (several connection counts, pipelining, every byte checked), stop it
# with SIGINT and check its summary accounts for every connection. Twice: polling through
# the host (the default) and on the device (--poll device, docs 12.9a).
#   echo_test.sh SERVER LOADGEN DEVICE
set -uo pipefail
server=$1 load=$2 device=$3
if [ "$device" = cuda ] && [ ! -e /dev/nvidia0 ] && [ ! -e /dev/nvidiactl ]; then
  echo "SKIP: no GPU (no /dev/nvidia*): the cuda device cannot run here"
  exit 77
fi
log=$(mktemp) && trap 'rm -f "$log"; [ -n "${pid:-}" ] && kill -9 "$pid" 2>/dev/null' EXIT
start() {
  for try in 1 2 3 4 5; do
    port=$((20000 + (RANDOM % 30000)))
    "$server" --device "$device" --port "$port" --address 127.0.0.1 --blocks 2 --conns-per-warp 64 --poll "$mode" >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 1 300); do
      grep -q "listening on" "$log" && return 0
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; pid=
    grep -q "Address already in use" "$log" || { cat "$log"; return 1; }
  done
  return 1
}
for mode in host device; do
echo "== polling: $mode"
start || { echo "FAIL: the server did not start"; exit 1; }
cat "$log"
if [ "$mode" = device ]; then
  grep -q "polling on the device" "$log" || { echo "FAIL: --poll device did not poll on the device"; exit 1; }
else
  grep -q "polling through the host" "$log" || { echo "FAIL: the default should poll through the host"; exit 1; }
fi
total=0
for spec in "1 64 1" "16 1024 4" "100 64 2" "8 20000 2"; do
  set -- $spec
  "$load" --port "$port" --connections "$1" --size "$2" --depth "$3" --duration 1 --warmup 0.2 \
    --label "echo-$1x$2x$3" || { echo "FAIL: load $spec"; kill -INT "$pid"; wait "$pid"; exit 1; }
  total=$((total + $1))
done
# The clients have closed; give the server a few poll passes to see every EOF.
sleep 1
kill -INT "$pid"
wait "$pid"; rc=$?
cat "$log"
[ "$rc" -eq 0 ] || { echo "FAIL: the server exited $rc"; exit 1; }
grep -q "connections $total accepted / $total closed by clients / 0 open at stop" "$log" ||
  { echo "FAIL: the summary does not account for $total connections"; exit 1; }
echo "PASS ($mode polling): $total connections served and closed, every byte checked"
done
