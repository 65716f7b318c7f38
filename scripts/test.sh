#!/usr/bin/env bash
# Builds and runs every gpusock test suite: the default build (CUDA compiled when nvcc is
# present; GPU tests run where a GPU is, and skip with their reason where not), then the
# cpu device under AddressSanitizer+UndefinedBehaviorSanitizer and ThreadSanitizer.
# Ends with one line: "total: N passed, N failed, N skipped".
# Usage: scripts/test.sh [default|asan|tsan]...   (all three by default)
set -uo pipefail
cd "$(dirname "$0")/.."
scripts/setup-deps.sh || exit 1
. scripts/env.sh
jobs=${GPUSOCK_JOBS:-$(nproc)}
presets=${*:-default asan tsan}
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
export TSAN_OPTIONS=${TSAN_OPTIONS:-halt_on_error=1:second_deadlock_stack=1}
pass=0 fail=0 skip=0 status=0
for p in $presets; do
  echo "=== gpusock tests: $p"
  if ! cmake --preset "$p" >/dev/null || ! cmake --build --preset "$p" -j "$jobs"; then
    echo "build failed: $p"
    status=1
    fail=$((fail + 1))
    continue
  fi
  junit="$PWD/build/$p/junit.xml"
  rm -f "$junit"
  ctest --preset "$p" -j "$jobs" --output-junit "$junit" || status=1
  if [ -f "$junit" ]; then
    read -r t f s < <(sed -n 's/.*<testsuite[^>]* tests="\([0-9]*\)"[^>]* failures="\([0-9]*\)"[^>]* skipped="\([0-9]*\)".*/\1 \2 \3/p' "$junit" | head -1)
    if [ -n "${t:-}" ]; then
      pass=$((pass + t - f - s)); fail=$((fail + f)); skip=$((skip + s))
    fi
  fi
done
echo "total: $pass passed, $fail failed, $skip skipped"
exit $status
