#!/usr/bin/env bash
# bench/http/collect-tools.sh DIR — copies nginx and wrk with the shared libraries they
# load into DIR/bin and DIR/lib, for a machine that has no package manager:
#
#   bench/http/collect-tools.sh .carry          # here, where `apt-get install nginx-light wrk` worked
#   GPUSOCK_TOOLS_DIR=.carry bench/http/run.sh  # there
#
# The C library and the dynamic loader stay behind (the target's own are used), so the
# two machines need compatible glibc versions (Debian 12's 2.36 or newer there).
set -euo pipefail
dir=${1:?usage: collect-tools.sh DIR}
mkdir -p "$dir/bin" "$dir/lib"
export PATH="$PATH:/usr/sbin:/sbin"
for tool in nginx wrk; do
  src=$(command -v "$tool") || { echo "$tool not found" >&2; exit 1; }
  cp -L "$src" "$dir/bin/$tool"
  ldd "$src" | awk '/=> \// { print $3 }' | while read -r lib; do
    case "$(basename "$lib")" in
      libc.so.*|libm.so.*|libpthread.so.*|libdl.so.*|librt.so.*|ld-linux*) ;;
      *) cp -L "$lib" "$dir/lib/" ;;
    esac
  done
done
echo "collected into $dir: $(ls "$dir/bin" | tr '\n' ' ')and $(ls "$dir/lib" | wc -l) libraries"
