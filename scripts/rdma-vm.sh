#!/usr/bin/env bash
# scripts/rdma-vm.sh — runs programs against a real (software) RDMA device: soft-RoCE
# (rdma_rxe) inside a QEMU VM booted from Debian's kernel image and a generated initramfs.
# Neither the CI machine's kernel nor the GPU machine's has rdma_rxe, and neither has KVM,
# so the VM runs under TCG. From nothing it installs what it needs (apt), fetches the
# kernel .deb, builds the initramfs with the given binaries and their library closure,
# boots, runs each command, and prints marker lines from the serial console:
#
#   RDMA-VM: BEGIN <name>     RDMA-VM: PASS <name>     RDMA-VM: FAIL <name> rc=<n>
#   RDMA-VM: DONE pass=<n> fail=<n>
#
# Exit status: 0 when every command passed, 1 when one failed, 2 when the VM did not
# report (boot failure, timeout).
#
#   scripts/rdma-vm.sh                                  # smoke: ib_send_lat over rxe0
#   scripts/rdma-vm.sh --bin build/cpu/tests/rdma/rdma_vm_test \
#       --run 'vmtest=rdma_vm_test --gtest_brief=1'
#
# Options:
#   --bin PATH          a program (or any file) put into /bin of the VM, with its ldd closure
#   --run NAME=CMD      a command run inside the VM (in order) under the marker NAME
#   --smoke             also run the ib_send_lat / ib_send_bw smoke (the default when no --run)
#   --out DIR           copy files the commands write to /out in the VM here (through the console)
#   --mem MiB           VM memory (default 2048)    --timeout S   whole-VM limit (default 1500)
#   --work DIR          cache for the kernel image and the initramfs (default ~/.cache/gpusock-rdma-vm)
#
# GPUSOCK_VM_APPEND, where set, is added to the VM kernel's command line (for example
# "clocksource=tsc tsc=reliable": under TCG the kernel picks the emulated HPET, whose
# every read is a system call, where a real machine reads the TSC in the vDSO).
#
# Inside the VM: a veth pair veth0 (10.77.0.1) / veth1 (10.77.0.2) and rxe0 on veth0.
# rdma_cm does not work over `lo` (rdma_resolve_route answers ENODEV), hence the veth
# pair. GID index 1 is rxe0's IPv4-mapped RoCE v2 entry. GPUSOCK_RDMA_ADDR=10.77.0.1 is
# exported for the commands.
set -euo pipefail

bins=()
runs=()
smoke=0
out_dir=""
mem=2048
timeout_s=1500
work="${HOME:-/tmp}/.cache/gpusock-rdma-vm"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --bin) bins+=("$2"); shift 2 ;;
    --run) runs+=("$2"); shift 2 ;;
    --smoke) smoke=1; shift ;;
    --out) out_dir="$2"; shift 2 ;;
    --mem) mem="$2"; shift 2 ;;
    --timeout) timeout_s="$2"; shift 2 ;;
    --work) work="$2"; shift 2 ;;
    -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
    *) echo "rdma-vm: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ ${#runs[@]} -eq 0 ]] && smoke=1

say() { echo "rdma-vm: $*" >&2; }

# ---- host packages ----------------------------------------------------------------------
need_pkgs=()
for p in qemu-system-x86 busybox-static cpio kmod libibverbs1 ibverbs-providers librdmacm1 \
         ibverbs-utils rdmacm-utils perftest iproute2; do
  dpkg -s "$p" >/dev/null 2>&1 || need_pkgs+=("$p")
done
if [[ ${#need_pkgs[@]} -gt 0 ]]; then
  say "installing ${need_pkgs[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

# ---- kernel image -----------------------------------------------------------------------
mkdir -p "$work"
kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[[ -n "$kpkg" ]] || { say "cannot resolve the kernel linux-image-amd64 depends on (apt-get update?)"; exit 2; }
kver=${kpkg#linux-image-}
ktree="$work/$kpkg"
if [[ ! -f "$ktree/boot/vmlinuz-$kver" ]]; then
  say "fetching $kpkg"
  rm -rf "$ktree" && mkdir -p "$ktree"
  (cd "$work" && rm -f "${kpkg}"_*.deb && apt-get download "$kpkg" >/dev/null 2>&1)
  dpkg-deb -x "$work"/"${kpkg}"_*.deb "$ktree"
  depmod -b "$ktree" "$kver"   # the .deb ships no modules.dep
fi

# ---- initramfs --------------------------------------------------------------------------
root=$(mktemp -d "$work/root.XXXXXX")
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,out,lib/modules,etc/libibverbs.d,usr/lib/x86_64-linux-gnu/libibverbs}
cp /bin/busybox "$root/bin/busybox"
for a in $("$root/bin/busybox" --list); do [[ -e "$root/bin/$a" ]] || ln -s busybox "$root/bin/$a"; done

# Modules in load order: modprobe -a -D resolves every dependency (crc32_generic is a soft
# dependency of rdma_rxe that modules.dep lacks, so it is named first).
modlist=$(modprobe -a -D -d "$ktree" -S "$kver" crc32_generic udp_tunnel ip6_udp_tunnel ib_core \
            ib_uverbs rdma_rxe configfs ib_cm iw_cm rdma_cm rdma_ucm ib_umad veth \
          | awk '$1=="insmod"{print $2}' | awk '!seen[$0]++')
: > "$root/etc/modules.order"
for m in $modlist; do
  base=$(basename "$m")
  case "$base" in
    *.ko.xz) xz -dc "$m" > "$root/lib/modules/${base%.xz}"; base=${base%.xz} ;;
    *.ko.zst) zstd -qdc "$m" > "$root/lib/modules/${base%.zst}"; base=${base%.zst} ;;
    *) cp "$m" "$root/lib/modules/$base" ;;
  esac
  echo "$base" >> "$root/etc/modules.order"
done

# Programs and their shared libraries, plus what is loaded at run time and ldd cannot see:
# the rxe verbs provider with its driver file, and libgcc_s (pthread_cancel, unwinding).
add_lib() {
  local f="$1"
  [[ -e "$root$f" ]] && return 0
  mkdir -p "$root$(dirname "$f")"
  cp -L "$f" "$root$f"
}
add_prog() {
  local p="$1" dest="$2"
  cp -L "$p" "$root$dest/$(basename "$p")"
  while read -r lib; do [[ -n "$lib" ]] && add_lib "$lib"; done < <(ldd "$p" 2>/dev/null | awk '/=>/{print $3} /^\t\//{print $1}' | grep '^/' || true)
}
vbin=(/usr/sbin/ip /usr/bin/rdma /usr/bin/ib_send_lat /usr/bin/ib_send_bw /usr/bin/ib_write_bw /usr/bin/ibv_devinfo /usr/bin/rping)
for p in "${vbin[@]}"; do add_prog "$p" /sbin; done
for p in "${bins[@]}"; do
  [[ -e "$p" ]] || { say "no such file: $p"; exit 2; }
  if ldd "$p" >/dev/null 2>&1; then add_prog "$p" /bin; else cp -L "$p" "$root/bin/"; fi
done
prov=$(ls /usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so | head -1)
add_prog "$prov" /usr/lib/x86_64-linux-gnu/libibverbs
cp /etc/libibverbs.d/rxe.driver "$root/etc/libibverbs.d/"
for l in /lib/x86_64-linux-gnu/libgcc_s.so.1 /usr/lib/x86_64-linux-gnu/libgcc_s.so.1; do
  [[ -e "$l" ]] && { add_lib "$l"; break; }
done
printf '/lib/x86_64-linux-gnu\n/usr/lib/x86_64-linux-gnu\n/usr/lib/x86_64-linux-gnu/libibverbs\n' > "$root/etc/ld.so.conf"
ldconfig -r "$root" 2>/dev/null || true
echo 'root:x:0:0:root:/:/bin/sh' > "$root/etc/passwd"

# The commands, one file each, so quoting survives.
i=0
if [[ $smoke -eq 1 ]]; then
  cat > "$root/etc/run.$i" <<'EOF'
ib_send_lat=sh -c 'ib_send_lat -d rxe0 -x 1 -n 1000 -s 64 >/tmp/lat.s 2>&1 & sleep 1; ib_send_lat -d rxe0 -x 1 -n 1000 -s 64 10.77.0.1 && wait'
EOF
  i=$((i + 1))
fi
for r in "${runs[@]}"; do printf '%s\n' "$r" > "$root/etc/run.$i"; i=$((i + 1)); done

cat > "$root/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mount -t tmpfs tmp /tmp; mkdir -p /dev/pts /dev/shm; mount -t tmpfs shm /dev/shm
mount -t configfs none /sys/kernel/config 2>/dev/null
ulimit -l unlimited; ulimit -n 65536
export PATH=/bin:/sbin HOME=/tmp GPUSOCK_RDMA_ADDR=10.77.0.1 GPUSOCK_DEVICE=cpu
for m in $(cat /etc/modules.order); do insmod /lib/modules/$m || echo "RDMA-VM: insmod $m failed"; done
ip link set lo up
/sbin/ip link add veth0 type veth peer name veth1
/sbin/ip addr add 10.77.0.1/24 dev veth0; /sbin/ip link set veth0 up
/sbin/ip addr add 10.77.0.2/24 dev veth1; /sbin/ip link set veth1 up
/sbin/rdma link add rxe0 type rxe netdev veth0 || echo "RDMA-VM: rdma link add failed"
sleep 1
echo "RDMA-VM: UP $(uname -r) cpus=$(nproc) $(ls /sys/class/infiniband 2>/dev/null)"
pass=0; fail=0
for f in /etc/run.*; do
  line=$(cat "$f"); name=${line%%=*}; cmd=${line#*=}
  echo "RDMA-VM: BEGIN $name"
  (cd /tmp && sh -c "$cmd"); rc=$?
  if [ $rc -eq 0 ]; then echo "RDMA-VM: PASS $name"; pass=$((pass+1)); else echo "RDMA-VM: FAIL $name rc=$rc"; fail=$((fail+1)); fi
done
for f in $(ls /out 2>/dev/null); do
  echo "RDMA-VM: FILE $f $(base64 -w0 /out/$f)"
done
echo "RDMA-VM: DONE pass=$pass fail=$fail"
poweroff -f
EOF
chmod +x "$root/init"
initrd="$work/initrd.$$.cpio.gz"
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -1 > "$initrd")

# ---- boot -------------------------------------------------------------------------------
log="$work/console.$$.log"
say "booting $kver under TCG (mem ${mem} MiB, limit ${timeout_s} s)"
set +e
timeout "$timeout_s" qemu-system-x86_64 -accel tcg -cpu max -m "$mem" -smp 2 -nographic -nic none \
  -no-reboot -kernel "$ktree/boot/vmlinuz-$kver" -initrd "$initrd" \
  -append "console=ttyS0 quiet panic=-1 ${GPUSOCK_VM_APPEND:-}" </dev/null 2>&1 | tee "$log" | grep --line-buffered -v '^RDMA-VM: FILE '
set -e
rm -f "$initrd"
if [[ -n "$out_dir" ]]; then
  mkdir -p "$out_dir"
  grep -a '^RDMA-VM: FILE ' "$log" | tr -d '\r' | while read -r _ _ name data; do
    echo "$data" | base64 -d > "$out_dir/$name"
  done
fi
done_line=$(grep -a '^RDMA-VM: DONE' "$log" | tr -d '\r' | tail -1)
rm -f "$log"
if [[ -z "$done_line" ]]; then say "the VM did not report (boot failure or timeout)"; exit 2; fi
[[ "$done_line" == *"fail=0"* ]] || exit 1
exit 0
