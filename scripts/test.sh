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
    # The <testsuite> element comes first; its attributes may span several lines.
    attr() { grep -o -m1 "[[:space:]]$1=\"[0-9]*\"" "$junit" | grep -o '[0-9]*'; }
    t=$(attr tests) f=$(attr failures) s=$(attr skipped)
    if [ -n "$t" ] && [ -n "$f" ] && [ -n "$s" ]; then
      pass=$((pass + t - f - s)); fail=$((fail + f)); skip=$((skip + s))
    else
      echo "cannot read test counts from $junit"
      status=1
    fi
  else
    echo "no test report from ctest ($p)"
    status=1
  fi
done
echo "total: $pass passed, $fail failed, $skip skipped"
exit $status
