#!/usr/bin/env bash
# Long fuzzing campaign over gpusock's four libFuzzer targets, one after another:
#   http       the HTTP example's request parser        (tests/http/parser_fuzz.cpp)
#   slot       the host's slot and socket-argument checks (tests/fuzz/slot_fuzz.cpp)
#   address    address text: ld_pton/ld_ntop, resolve_address (tests/fuzz/address_fuzz.cpp)
#   rdma_wire  the RDMA wire-protocol decoder           (tests/fuzz/rdma_wire_fuzz.cpp)
#
# Standalone: needs clang++ with its libFuzzer runtime (Debian: clang, libclang-rt-dev on
# newer releases), nothing built by CMake. Each target is compiled here with
# -fsanitize=fuzzer,address,undefined, its seed corpus is copied into the work directory
# (the repository's seeds are never written), and the fuzzer runs under `nice -n 10` for
# a fixed number of executions. Ends with one line per target:
#   target  executions  seconds  exec/s  corpus  crashes
# "crashes" counts the crash-/leak-/timeout-/oom- inputs libFuzzer saved (a failed run
# with none saved counts 1). Exit status 0 only when every target ran to the end with none.
# docs/architecture.md, section 18.1, records a campaign's figures.
#
# Usage: scripts/fuzz.sh [-r RUNS] [-w WORKDIR] [target...]
#   -r RUNS     executions per target (default 10000000)
#   -w WORKDIR  binaries, corpora, logs and crash inputs (default build/fuzz-campaign)
#   target...   a subset of: http slot address rdma_wire (default all four)
# Environment: CXX_FUZZ (default clang++), FUZZ_ARGS (extra libFuzzer flags).
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
runs=10000000
work=build/fuzz-campaign
while getopts "r:w:h" o; do
  case $o in
    r) runs=$OPTARG ;;
    w) work=$OPTARG ;;
    *) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
targets=${*:-http slot address rdma_wire}
cxx=${CXX_FUZZ:-clang++}
command -v "$cxx" >/dev/null || { echo "fuzz.sh: $cxx not found (install clang)"; exit 2; }
mkdir -p "$work" || exit 2
work=$(cd "$work" && pwd)
cc=(nice -n 10 "$cxx")
flags=(-std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all)
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}

# Sources, include directories and seed directory of each target, as tests/*/CMakeLists.txt
# builds them.
build() {
  local t=$1 out=$work/bin/$1_fuzzer
  mkdir -p "$work/bin"
  case $t in
    http) "${cc[@]}" "${flags[@]}" -Iexamples/http -Ihostcall/include tests/http/parser_fuzz.cpp -o "$out" ;;
    slot) "${cc[@]}" "${flags[@]}" -Itests/fuzz -I. -Ihostcall/include -Inet/include tests/fuzz/slot_fuzz.cpp \
            hostcall/src/decode.cpp -o "$out" ;;
    address) "${cc[@]}" "${flags[@]}" -Itests/fuzz -Ihostcall/include -Inet/include tests/fuzz/address_fuzz.cpp \
               net/src/address.cpp -o "$out" ;;
    rdma_wire) "${cc[@]}" "${flags[@]}" -Itests/fuzz -Irdma/include tests/fuzz/rdma_wire_fuzz.cpp rdma/src/wire.cpp \
                 -o "$out" ;;
    *) echo "fuzz.sh: unknown target '$t' (http slot address rdma_wire)"; return 2 ;;
  esac
}
seeds() {
  case $1 in
    http) echo tests/http/fuzz_corpus ;;
    *) echo "tests/fuzz/corpus/$1" ;;
  esac
}

status=0
report=()
for t in $targets; do
  echo "=== $t: building"
  if ! build "$t"; then
    report+=("$(printf '%-10s build failed' "$t")")
    status=1
    continue
  fi
  corpus=$work/corpus/$t
  art=$work/artifacts/$t
  mkdir -p "$corpus" "$art"
  cp -n "$(seeds "$t")"/* "$corpus"/
  log=$work/$t.log
  echo "=== $t: $runs executions, log $log"
  start=$(date +%s.%N)
  # One input takes microseconds; a busy shared machine can still stall the process for
  # over ten seconds (ctest's -timeout=10), which libFuzzer would report as a hang.
  nice -n 10 "$work/bin/${t}_fuzzer" -runs="$runs" -max_len=4096 -timeout=60 -print_final_stats=1 \
    -artifact_prefix="$art/" ${FUZZ_ARGS:-} "$corpus" >"$log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)
  execs=${execs:-0}
  crashes=$(find "$art" -maxdepth 1 -type f \( -name 'crash-*' -o -name 'leak-*' -o -name 'timeout-*' \
            -o -name 'oom-*' \) | wc -l)
  if [ "$rc" -ne 0 ] && [ "$crashes" -eq 0 ]; then crashes=1; fi
  [ "$crashes" -eq 0 ] && [ "$execs" -ge "$runs" ] || status=1
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.0f", b - a }')
  rate=$(awk -v n="$execs" -v s="$secs" 'BEGIN { printf "%.0f", (s > 0 ? n / s : 0) }')
  # libFuzzer's own count of the inputs it keeps (the directory also holds the inputs
  # that later, smaller ones replaced).
  files=$(grep -o 'corp: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
  report+=("$(printf '%-10s %11s %8s %8s %7s %7s' "$t" "$execs" "$secs" "$rate" "${files:-?}" "$crashes")")
  echo "${report[-1]}"
done
echo
printf '%-10s %11s %8s %8s %7s %7s\n' target executions seconds exec/s corpus crashes
printf '%s\n' "${report[@]}"
exit $status
