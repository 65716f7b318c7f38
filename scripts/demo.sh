#!/usr/bin/env bash
# Builds gpusock and runs the main demo: kernels that call a user-defined hostcall,
# write to stdout and read the device clock. Runs on the GPU when there is one, else on
# the cpu device (GPUSOCK_DEVICE=cpu|cuda chooses).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-deps.sh
. scripts/env.sh
cmake --preset default >/dev/null
cmake --build --preset default --target custom_hostcall
exec build/default/examples/custom_hostcall/custom_hostcall "$@"
