#!/usr/bin/env bash
# Soak: the echo and HTTP examples under bounded load for a long time, with the server's
# memory and descriptor counts sampled between rounds of load. Not part of the default
# test run (ctest runs a one-minute version of it only under the label "soak").
#
#   scripts/soak.sh                            # 10 minutes each, cpu device, both servers
#   scripts/soak.sh --minutes 10 --device cuda --bin .carry echo http
#
# Each server runs for --minutes. Load comes in rounds of --round seconds; every round
# opens new connections (the shapes rotate), checks its answers, and closes them. After
# each round the script waits for the server to see every close (its descriptor count back
# at the baseline's, at most 60 s) and then samples, from /proc/PID: VmRSS, the number of
# open descriptors, and the number of threads.
#
# Pass, per server:
#   - every load round succeeded (gpusock-echo-bench checks every byte it gets back; wrk
#     reports no socket errors and no non-2xx answers);
#   - the descriptor and thread counts after every round equal those after the first one
#     (the baseline: the first round allocates what a server keeps for its lifetime);
#   - VmRSS after the last round is at most --rss-slack-mib (default 8) above the baseline;
#   - the server stops on SIGINT with exit status 0.
# Samples go to OUT/soak-<server>.csv, a summary line per server to stdout and to
# OUT/soak.json. Exit status 0 when every server passed.
#
# Options: --minutes M (10), --round S (20), --device cpu|cuda (cpu), --bin DIR (a folder
# holding gpusock-echo, gpusock-echo-bench and http_server; default: build/default's),
# --out DIR ($OUT or soak-out), --rss-slack-mib N (8). The environment variables
# GPUSOCK_ECHO_SERVER, GPUSOCK_ECHO_BENCH and GPUSOCK_HTTP_SERVER name the binaries one by
# one instead. wrk comes from PATH, or from GPUSOCK_TOOLS_DIR/bin with
# GPUSOCK_TOOLS_DIR/lib (bench/http/collect-tools.sh).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

minutes=10 round=20 device=cpu bin="" out="${OUT:-soak-out}" slack=8 servers=()
while (($#)); do
  case $1 in
    --minutes) minutes=$2; shift 2 ;;
    --round) round=$2; shift 2 ;;
    --device) device=$2; shift 2 ;;
    --bin) bin=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --rss-slack-mib) slack=$2; shift 2 ;;
    echo | http) servers+=("$1"); shift ;;
    -h | --help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "soak.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
((${#servers[@]})) || servers=(echo http)
if [[ -n "${GPUSOCK_TOOLS_DIR:-}" ]]; then
  tools="$(cd "$GPUSOCK_TOOLS_DIR" && pwd)"
  export PATH="$tools/bin:$PATH" LD_LIBRARY_PATH="$tools/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
find_bin() {  # name, then the build-tree path
  if [[ -n "$bin" ]]; then echo "$bin/$1"; else echo "$repo/build/default/$2"; fi
}
echo_server=${GPUSOCK_ECHO_SERVER:-$(find_bin gpusock-echo examples/echo/gpusock-echo)}
echo_load=${GPUSOCK_ECHO_BENCH:-$(find_bin gpusock-echo-bench examples/echo/gpusock-echo-bench)}
http_server=${GPUSOCK_HTTP_SERVER:-$(find_bin http_server examples/http/http_server)}
mkdir -p "$out"
deadline_s=$(awk -v m="$minutes" 'BEGIN { printf "%d", m * 60 }')

pid="" log=""
cleanup() { [[ -n "$pid" ]] && kill -9 "$pid" 2>/dev/null; }
trap cleanup EXIT

# Starts "$@ --port P" on a random free port and waits for its "listening on" line.
start_server() {
  local try
  for try in 1 2 3 4 5; do
    port=$((20000 + RANDOM % 30000))
    log="$out/soak-$name.log"
    "$@" --port "$port" >"$log" 2>&1 &
    pid=$!
    for _ in $(seq 1 600); do
      grep -q "listening on" "$log" && return 0
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; pid=""
    grep -q "in use" "$log" || { cat "$log"; return 1; }
  done
  return 1
}

sample() {  # prints "rss_kib fds threads"
  local rss threads fds
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$pid/status")
  threads=$(awk '/^Threads:/ { print $2 }' "/proc/$pid/status")
  fds=$(ls "/proc/$pid/fd" | wc -l)
  echo "$rss $fds $threads"
}

# One round of load against the running server; prints the requests it completed (echo:
# req/s x seconds), or
# returns non-zero with the tool's output on stderr.
echo_shapes=("32 1024 2" "64 64 1" "8 16384 4" "128 256 1")
load_round() {
  local n=$1 text
  if [[ $name == echo ]]; then
    local shape=(${echo_shapes[$((n % ${#echo_shapes[@]}))]})
    text=$("$echo_load" --port "$port" --connections "${shape[0]}" --size "${shape[1]}" \
      --depth "${shape[2]}" --duration "$round" --warmup 0 --label "soak-$n" 2>&1) ||
      { echo "$text" >&2; return 1; }
    grep -q "errors 0$" <<<"$text" || { echo "$text" >&2; return 1; }
    # "... 64 B: 447 req/s, ..." -> requests in the round
    awk -v s="$round" '{ for (i = 2; i <= NF; i++) if ($i ~ /^req\/s/) { printf "%d\n", $(i - 1) * s; exit } }' <<<"$text"
  else
    local conns=$((n % 2 ? 64 : 16)) path=$((n % 2)) url
    if ((path)); then url="http://127.0.0.1:$port/4k.bin"; else url="http://127.0.0.1:$port/healthz"; fi
    text=$(wrk -t2 -c"$conns" -d"${round}s" --timeout 10s "$url" 2>&1) || { echo "$text" >&2; return 1; }
    if grep -qE "Socket errors|Non-2xx" <<<"$text"; then echo "$text" >&2; return 1; fi
    awk '/requests in/ { print $1; exit }' <<<"$text"
  fi
}

# Waits for the server to see the round's closes. Before the baseline exists: until the
# descriptor count has not changed for 2 s. After: until it is back at the baseline's,
# for at most 60 s (a loaded cpu device can take seconds to poll every connection); the
# sample taken after that is what the check judges.
settle() {
  local want=$1 last="" now same=0
  for _ in $(seq 1 300); do
    now=$(ls "/proc/$pid/fd" | wc -l)
    if [[ -n "$want" ]]; then
      [[ "$now" == "$want" ]] && return 0
    else
      if [[ "$now" == "$last" ]]; then same=$((same + 1)); else same=0; fi
      ((same >= 10)) && return 0
    fi
    last=$now
    sleep 0.2
  done
}

soak_one() {
  name=$1
  local csv="$out/soak-$name.csv" rounds=0 failed="" total=0
  case $name in
    echo)
      [[ -x "$echo_server" && -x "$echo_load" ]] || { echo "soak echo: $echo_server or $echo_load missing" >&2; return 1; }
      start_server "$echo_server" --device "$device" --address 127.0.0.1 || return 1 ;;
    http)
      [[ -x "$http_server" ]] || { echo "soak http: $http_server missing" >&2; return 1; }
      command -v wrk >/dev/null || { echo "soak http: wrk not found (apt-get install wrk, or GPUSOCK_TOOLS_DIR)" >&2; return 1; }
      start_server "$http_server" --device "$device" --address 127.0.0.1 \
        --root "$repo/tests/http/www" || return 1 ;;
  esac
  echo "t_s,round,requests,rss_kib,fds,threads" >"$csv"
  local t0=$SECONDS base="" last="" reqs
  while :; do
    reqs=$(load_round "$rounds") || { failed="load round $rounds failed"; break; }
    settle "$(cut -d' ' -f2 <<<"$base")"
    read -r rss fds threads < <(sample)
    echo "$((SECONDS - t0)),$rounds,${reqs:-0},$rss,$fds,$threads" >>"$csv"
    total=$((total + ${reqs:-0}))
    if [[ -z "$base" ]]; then
      base="$rss $fds $threads"
    else
      read -r brss bfds bthreads <<<"$base"
      [[ "$fds" == "$bfds" ]] || { failed="round $rounds: $fds descriptors open, $bfds after the first round"; break; }
      [[ "$threads" == "$bthreads" ]] || { failed="round $rounds: $threads threads, $bthreads after the first round"; break; }
    fi
    last="$rss $fds $threads"
    rounds=$((rounds + 1))
    ((SECONDS - t0 < deadline_s)) || break  # at least --minutes of load
  done
  kill -INT "$pid" 2>/dev/null
  local rc=0
  wait "$pid" || rc=$?
  pid=""
  [[ -z "$failed" && $rc -ne 0 ]] && failed="the server exited $rc on SIGINT (log: $log)"
  read -r brss bfds bthreads <<<"${base:-0 0 0}"
  read -r lrss lfds lthreads <<<"${last:-0 0 0}"
  local growth=$(((lrss - brss) / 1024))
  if [[ -z "$failed" ]] && ((lrss - brss > slack * 1024)); then
    failed="VmRSS grew $growth MiB (baseline $((brss / 1024)) MiB, slack $slack MiB)"
  fi
  ((rounds >= 2)) || [[ -n "$failed" ]] || failed="only $rounds round(s): give more --minutes"
  local verdict=PASS
  [[ -n "$failed" ]] && verdict=FAIL
  printf 'soak %-4s %s: device %s, %d s, %d rounds, %d requests; VmRSS %d -> %d KiB (%+d MiB), fds %s -> %s, threads %s -> %s%s\n' \
    "$name" "$verdict" "$device" "$((SECONDS - t0))" "$rounds" "$total" "$brss" "$lrss" "$growth" \
    "$bfds" "$lfds" "$bthreads" "$lthreads" "${failed:+: $failed}"
  printf '{"server":"%s","verdict":"%s","device":"%s","seconds":%d,"rounds":%d,"requests":%d,"rss_kib_base":%d,"rss_kib_end":%d,"fds_base":%d,"fds_end":%d,"threads_base":%d,"threads_end":%d}\n' \
    "$name" "$verdict" "$device" "$((SECONDS - t0))" "$rounds" "$total" "$brss" "$lrss" "$bfds" "$lfds" \
    "$bthreads" "$lthreads" >>"$out/soak.json"
  [[ $verdict == PASS ]]
}

rm -f "$out/soak.json"
status=0
for s in "${servers[@]}"; do soak_one "$s" || status=1; done
exit $status
