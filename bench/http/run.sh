#!/usr/bin/env bash
# bench/http/run.sh — the GPU HTTP server (examples/http) against nginx, same wrk client,
# same host cores, measured in one run.
#
#   bench/http/run.sh                      # finds the server in build/default or build/cpu
#   GPUSOCK_TOOLS_DIR=.carry bench/http/run.sh   # nginx, wrk (bin/) and their libraries (lib/)
#
# For each target (plaintext: GET /healthz, 3 bytes, which nginx answers with `return 200`;
# static: GET /4k.bin, a 4 KiB file) and each connection count (64, 256), wrk runs against
# nginx and then against the GPU server, keep-alive, for DURATION seconds after a 1 s
# warm-up. Both servers run under `taskset -c $SERVER_CPUS` and nginx gets one worker per
# core in that set (the cores the GPU server's host side may use); wrk runs on
# $CLIENT_CPUS. Prints a table with the ratio GPU/nginx and writes JSON to $JSON.
#
# Environment (all optional):
#   GPUSOCK_HTTP_SERVER  the http_server binary
#   GPUSOCK_TOOLS_DIR    a folder with bin/{nginx,wrk} and lib/ (added to LD_LIBRARY_PATH)
#   SERVER_CPUS          cores for the servers (default: 0)
#   CLIENT_CPUS          cores for wrk (default: every other core, or 0 on a 1-core host)
#   DURATION             seconds per measurement (default 10)
#   WRK_THREADS          wrk threads (default: cores in CLIENT_CPUS, at most 8)
#   CONNS                connection counts (default "64 256")
#   SERVER_ARGS          extra arguments for http_server (e.g. "--grid 16 --warps 4")
#   SERVICE_THREADS      http_server --service-threads (default: cores in SERVER_CPUS)
#   JSON                 output file (default bench/http/results-<device>.json)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"

if [[ -n "${GPUSOCK_TOOLS_DIR:-}" ]]; then
  tools="$(cd "$GPUSOCK_TOOLS_DIR" && pwd)"
  export PATH="$tools/bin:$tools/sbin:$PATH"
  export LD_LIBRARY_PATH="$tools/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export PATH="$PATH:/usr/sbin:/sbin"

server="${GPUSOCK_HTTP_SERVER:-}"
if [[ -z "$server" ]]; then
  for c in "$repo/build/default/examples/http/http_server" "$repo/build/cpu/examples/http/http_server"; do
    if [[ -x "$c" ]]; then server="$c"; break; fi
  done
fi
for need in nginx wrk taskset; do
  command -v "$need" >/dev/null || { echo "run.sh: $need not found (PATH or GPUSOCK_TOOLS_DIR/bin)" >&2; exit 2; }
done
[[ -x "$server" ]] || { echo "run.sh: http_server not found; build it or set GPUSOCK_HTTP_SERVER" >&2; exit 2; }

ncpu=$(nproc)
server_cpus="${SERVER_CPUS:-0}"
if [[ -z "${CLIENT_CPUS:-}" ]]; then
  if ((ncpu > 1)); then CLIENT_CPUS="1-$((ncpu - 1))"; else CLIENT_CPUS=0; fi
fi
count_cpus() {  # "0-3,8" -> 5
  local n=0 part
  IFS=, read -ra parts <<<"$1"
  for part in "${parts[@]}"; do
    if [[ "$part" == *-* ]]; then n=$((n + ${part#*-} - ${part%-*} + 1)); else n=$((n + 1)); fi
  done
  echo "$n"
}
server_cores=$(count_cpus "$server_cpus")
client_cores=$(count_cpus "$CLIENT_CPUS")
duration="${DURATION:-10}"
wrk_threads="${WRK_THREADS:-$((client_cores < 8 ? client_cores : 8))}"
conns="${CONNS:-64 256}"
service_threads="${SERVICE_THREADS:-$server_cores}"

tmp="$(mktemp -d /tmp/gpusock-http-bench.XXXXXX)"
chmod 755 "$tmp"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
mkdir -p "$tmp/www" "$tmp/nginx"
head -c 4096 /dev/urandom >"$tmp/www/4k.bin"
chmod -R a+rX "$tmp/www"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null ||
  echo $((20000 + RANDOM % 20000)); }

# nginx, unprivileged, everything in the temp folder.
nginx_port=$(free_port)
cat >"$tmp/nginx/nginx.conf" <<EOF
worker_processes $server_cores;
pid $tmp/nginx/nginx.pid;
error_log $tmp/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $tmp/nginx/body;
  proxy_temp_path $tmp/nginx/proxy;
  fastcgi_temp_path $tmp/nginx/fastcgi;
  uwsgi_temp_path $tmp/nginx/uwsgi;
  scgi_temp_path $tmp/nginx/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 60s;
  tcp_nodelay on;
  sendfile on;
  types { application/octet-stream bin; }
  server {
    listen 127.0.0.1:$nginx_port reuseport backlog=4096;
    root $tmp/www;
    location = /healthz { default_type text/plain; return 200 "ok\n"; }
  }
}
EOF
nginx_version=$(nginx -v 2>&1 | sed 's/.*nginx\///')
taskset -c "$server_cpus" nginx -e "$tmp/nginx/error.log" -p "$tmp/nginx" -c "$tmp/nginx/nginx.conf" -g 'daemon off;' &
pids+=($!)

# The GPU server.
gpu_port=$(free_port)
# shellcheck disable=SC2086
taskset -c "$server_cpus" "$server" --address 127.0.0.1 --port "$gpu_port" --root "$tmp/www" \
  --max-connections 4096 --conns-per-lane 8 --service-threads "$service_threads" ${SERVER_ARGS:-} >"$tmp/gpu.out" 2>&1 &
gpu_pid=$!
pids+=($gpu_pid)

wait_port() {  # bash's /dev/tcp: no curl needed
  for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.2
  done
  return 1
}
wait_port "$nginx_port" || { echo "nginx did not start:" >&2; cat "$tmp/nginx/error.log" >&2; exit 1; }
wait_port "$gpu_port" || { echo "http_server did not start:" >&2; cat "$tmp/gpu.out" >&2; exit 1; }
device=$(sed -n 's/.*(device \([a-z]*\).*/\1/p' "$tmp/gpu.out" | head -1)
echo "$(head -1 "$tmp/gpu.out")"
echo "nginx $nginx_version, $server_cores worker(s); servers on cores $server_cpus, wrk ($wrk_threads threads) on cores $CLIENT_CPUS; ${duration}s per run"

# Runs wrk; prints "req_per_s p50_ms p99_ms errors requests".
measure() {
  local url=$1 c=$2 t=$wrk_threads out
  ((t > c)) && t=$c
  taskset -c "$CLIENT_CPUS" wrk -t"$t" -c"$c" -d1s "$url" >/dev/null 2>&1 || true
  out=$(taskset -c "$CLIENT_CPUS" wrk -t"$t" -c"$c" -d"${duration}s" --timeout 10s --latency "$url" 2>&1)
  echo "$out" >>"$tmp/wrk.log"
  awk '
    /Requests\/sec:/ { rps = $2 }
    /requests in/ { reqs = $1 }
    /^ +50%/ { p50 = $2 } /^ +99%/ { p99 = $2 }
    /Socket errors:/ { gsub(/,/, ""); err = $4 + $6 + $8 + $10 }
    /Non-2xx/ { err += $NF }
    function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
    END { printf "%s %.3f %.3f %d %s\n", rps + 0, ms(p50), ms(p99), err + 0, reqs + 0 }' <<<"$out"
}

json="${JSON:-$here/results-${device:-unknown}.json}"
rows=()
any_err=0
printf '\n%-10s %6s | %12s %9s %9s | %12s %9s %9s | %7s\n' target conns "nginx req/s" "p50 ms" "p99 ms" "gpu req/s" "p50 ms" "p99 ms" ratio
for target in plaintext static4k; do
  path=/healthz
  [[ $target == static4k ]] && path=/4k.bin
  for c in $conns; do
    read -r n_rps n_p50 n_p99 n_err n_req <<<"$(measure "http://127.0.0.1:$nginx_port$path" "$c")"
    read -r g_rps g_p50 g_p99 g_err g_req <<<"$(measure "http://127.0.0.1:$gpu_port$path" "$c")"
    ratio=$(awk -v g="$g_rps" -v n="$n_rps" 'BEGIN { printf "%.3f", (n > 0 ? g / n : 0) }')
    printf '%-10s %6s | %12.0f %9s %9s | %12.0f %9s %9s | %7s\n' "$target" "$c" "$n_rps" "$n_p50" "$n_p99" "$g_rps" "$g_p50" "$g_p99" "$ratio"
    if ((n_err + g_err > 0)); then
      echo "  errors: nginx $n_err, gpu $g_err (wrk output below)"
      any_err=1
    fi
    rows+=("{\"target\": \"$target\", \"path\": \"$path\", \"connections\": $c, \"nginx\": {\"req_per_s\": $n_rps, \"p50_ms\": $n_p50, \"p99_ms\": $n_p99, \"errors\": $n_err, \"requests\": $n_req}, \"gpu\": {\"req_per_s\": $g_rps, \"p50_ms\": $g_p50, \"p99_ms\": $g_p99, \"errors\": $g_err, \"requests\": $g_req}, \"ratio_gpu_over_nginx\": $ratio}")
  done
done

kill -INT "$gpu_pid" 2>/dev/null || true
wait "$gpu_pid" 2>/dev/null || true
summary=$(grep '^summary:' "$tmp/gpu.out" || true)
echo "$summary"
((any_err)) && cat "$tmp/wrk.log"

{
  echo "{"
  echo "  \"benchmark\": \"http\","
  echo "  \"server\": $(printf '%s' "$(head -1 "$tmp/gpu.out")" | python3 -c 'import json,sys; print(json.dumps(sys.stdin.read()))' 2>/dev/null || echo '""'),"
  echo "  \"nginx_version\": \"$nginx_version\", \"nginx_workers\": $server_cores,"
  echo "  \"server_cpus\": \"$server_cpus\", \"client_cpus\": \"$CLIENT_CPUS\", \"wrk_threads\": $wrk_threads, \"duration_s\": $duration,"
  echo "  \"host\": \"$(uname -srm) $(nproc) cores\","
  echo "  \"results\": ["
  for i in "${!rows[@]}"; do
    sep=","
    ((i == ${#rows[@]} - 1)) && sep=""
    echo "    ${rows[$i]}$sep"
  done
  echo "  ]"
  echo "}"
} >"$json"
echo "wrote $json"
