#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages gpusock builds with, if any are missing.
# CUDA is not installed here: with nvcc on PATH (or in /usr/local/cuda/bin) the build
# includes the cuda device, without it the cpu device only.
set -euo pipefail
# liburing-dev: the io_uring backend (linked statically); netcat-openbsd: the external-client test;
# gRPC and protobuf: the control plane and gpusockctl (control/).
pkgs=(cmake ninja-build g++ make pkg-config git libgtest-dev libgmock-dev googletest liburing-dev netcat-openbsd
      libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "gpusock: installing ${missing[*]}"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
