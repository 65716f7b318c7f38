#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages gpusock builds with, if any are missing.
# CUDA is not installed here: with nvcc on PATH (or in /usr/local/cuda/bin) the build
# includes the cuda device, without it the cpu device only.
set -euo pipefail
# liburing-dev: the io_uring backend (linked statically); netcat-openbsd: the external-client test;
# librdmacm-dev, libibverbs-dev, ibverbs-providers: the rdma backend (scripts/rdma-vm.sh installs what its VM needs);
# gRPC and protobuf: the control plane and gpusockctl (control/).
pkgs=(cmake ninja-build g++ make pkg-config git libgtest-dev libgmock-dev googletest liburing-dev netcat-openbsd
      librdmacm-dev libibverbs-dev ibverbs-providers
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Optional, taken when the archive has them (tests that need one skip without it):
# curl and wrk drive the HTTP example's tests, clang builds its libFuzzer target, nginx is
# the HTTP benchmark's baseline (nginx-light on Debian 12, nginx where that is gone).
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
optional=()
for alts in curl wrk clang "nginx-light nginx"; do
  have=0
  for p in $alts; do installed "$p" && have=1; done
  ((have)) || optional+=("$alts")
done
if ((${#missing[@]} + ${#optional[@]})); then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  for alts in "${optional[@]}"; do
    for p in $alts; do
      if apt-cache show "$p" >/dev/null 2>&1; then missing+=("$p"); break; fi
    done
  done
  echo "gpusock: installing ${missing[*]}"
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
