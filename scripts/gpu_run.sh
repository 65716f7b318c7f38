#!/usr/bin/env bash
# Runs gpusock's GPU test and benchmark binaries on a GPU machine, from a folder of
# prebuilt binaries (default .carry/). Logs and JSON go to $OUT (or ./gpu-out).
# Usage: scripts/gpu_run.sh [tests|sanitize|bench|all]...
set -u
bin=${GPUSOCK_BIN:-.carry}
out=${OUT:-gpu-out}
mkdir -p "$out"
what=${*:-all}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for step in $what; do
  case $step in
    tests|all)
      for t in "$bin"/*_test; do
        echo "== $t"
        "$t" --gtest_brief=1 2>&1 | tee "$out/$(basename "$t").log" | tail -25
      done ;;&
    sanitize|all)
      cs=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
      for tool in memcheck racecheck synccheck; do
        for t in "$bin"/*_test; do
          echo "== compute-sanitizer --tool $tool $t"
          GPUSOCK_DEVICE=cuda timeout 240 "$cs" --tool "$tool" --error-exitcode 9 "$t" --gtest_brief=1 \
            --gtest_filter="${SANITIZE_FILTER:-*cuda*:-*Million*}" > "$out/cs-$tool-$(basename "$t").log" 2>&1
          echo "exit $?"; tail -4 "$out/cs-$tool-$(basename "$t").log"
        done
      done ;;&
    bench|all)
      for b in "$bin"/*_bench; do
        echo "== $b"
        "$b" --json "$out/$(basename "$b").json" 2>&1 | tee "$out/$(basename "$b").log"
      done ;;
  esac
done
