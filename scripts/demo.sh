#!/usr/bin/env bash
# Builds gpusock and runs the main demo: the echo server kernel (examples/echo) under load
# from gpusock-echo-bench, which checks every byte that comes back; then the server's
# SIGINT summary. Runs on the GPU when there is one, else on the cpu device
# (GPUSOCK_DEVICE=cpu|cuda chooses).
#   scripts/demo.sh [seconds of load, default 5] [connections, default 64]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-deps.sh
. scripts/env.sh
cmake --preset default >/dev/null
cmake --build --preset default --target gpusock-echo gpusock-echo-bench
secs=${1:-5} conns=${2:-64}
bin=build/default/examples/echo
port=$((20000 + RANDOM % 30000))
log=$(mktemp)
"$bin/gpusock-echo" --port "$port" --address 127.0.0.1 >"$log" 2>&1 &
pid=$!
trap 'kill -9 $pid 2>/dev/null; rm -f "$log"' EXIT
for _ in $(seq 1 300); do
  grep -q "listening on" "$log" && break
  kill -0 $pid 2>/dev/null || { cat "$log"; exit 1; }
  sleep 0.1
done
cat "$log"
echo "--- $conns connections, 64-byte messages, depth 4, ${secs} s (every byte checked)"
"$bin/gpusock-echo-bench" --port "$port" --connections "$conns" --size 64 --depth 4 --duration "$secs" --warmup 1 \
  --label gpusock-echo
status=$?
sleep 0.5
kill -INT $pid
wait $pid || status=1
tail -n 1 "$log"
exit $status
