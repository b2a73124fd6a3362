#!/bin/sh
# shellcheck shell=dash
# qemu-as-tandem.sh — a TEST DOUBLE, not Tandem: takes Tandem's command line and runs
# Debian 12's QEMU 7.2 with the equivalent devices instead. It runs inside L1 (busybox sh).
#
# Two uses:
#   - the QEMU side of resources/bench/net.sh and blk.sh: both VMMs get the very same
#     arguments, and this file is the one place that says how QEMU is configured;
#   - TANDEM_BIN=resources/bench/qemu-as-tandem.sh for those benchmarks (or as the overlay's
#     /bin/tandem), to validate scenarios and images before Tandem has the feature.
#
# Understood (as Tandem parses them): --kernel PATH, --initramfs PATH, --cmdline STR,
# --cpus N, --memory SIZE, --serial stdio|off|file=PATH,
# --net tap=NAME[,mac=MAC][,id=ID][,queues=N], --disk path=PATH[,readonly=on][,direct=on][,id=ID],
# --device path=/sys/bus/pci/devices/BDF[,id=ID], --api-socket PATH (--flag VALUE or --flag=VALUE; --net/--disk/
# --device repeatable, in order).
#
# The QEMU configuration (the comparison point of the benchmarks):
#   -M q35 -accel kvm -cpu host, -nodefaults, no firmware besides SeaBIOS' -kernel boot.
#   --net  -> -netdev tap,ifname=NAME,script=no,downscript=no,vhost=off[,queues=N]
#             -device virtio-net-pci,romfile=[,mac=MAC][,mq=on,vectors=2N+2]
#             Userspace virtio-net (vhost=off) like Tandem's. A missing tap is created by
#             QEMU and disappears when it exits, as with Tandem.
#   --disk -> -drive if=none,format=raw,aio=threads,cache=writeback (direct=on: cache=none)
#             [,readonly=on]  -device virtio-blk-pci,serial=ID
#             Buffered I/O through L1's page cache, like Tandem without direct=on; QEMU's
#             default thread-pool AIO; the virtio serial (what the guest sees in
#             /sys/block/vdX/serial) is the disk's id.
#   --device -> -device vfio-pci,host=BDF,romfile=  QEMU leaves binding to the caller: the
#             device must already be on vfio-pci (Tandem binds it itself).
#   --api-socket PATH -> -qmp unix:PATH,server=on,wait=off  (QMP, not Tandem's protocol).
# Environment: QEMU_AS_TANDEM_MACHINE (default q35) replaces the -M value;
# QEMU_AS_TANDEM_ARGS: more QEMU arguments, split at spaces (e.g. a pcie-root-port to
# device_add into); QEMU_AS_TANDEM_VERBOSE=1 prints the QEMU command line on stderr.
set -u
die() { echo "qemu-as-tandem: $*" >&2; exit 2; }

kernel="" initrd="" cmdline="console=ttyS0 panic=-1" cpus=1 mem=512M serial=stdio qmp=
devs=""   # QEMU arguments for the devices, one per line
nnet=0 ndisk=0

# The value of key K in a comma list, or empty.
get() {
  _IFS=$IFS; IFS=,
  for _kv in $2; do
    case $_kv in "$1"=*) IFS=$_IFS; echo "${_kv#*=}"; return ;; esac
  done
  IFS=$_IFS
}

add_net() {
  tap=$(get tap "$1") mac=$(get mac "$1") id=$(get id "$1") q=$(get queues "$1")
  [ -n "$tap" ] || die "--net $1: tap=NAME is required"
  [ -n "$id" ] || id=net$nnet
  nd="tap,id=nd$nnet,ifname=$tap,script=no,downscript=no,vhost=off"
  dv="virtio-net-pci,netdev=nd$nnet,id=$id,romfile="   # no PXE ROM: -kernel boot
  [ -n "$mac" ] && dv="$dv,mac=$mac"
  if [ -n "$q" ] && [ "$q" -gt 1 ]; then
    nd="$nd,queues=$q"; dv="$dv,mq=on,vectors=$((2 * q + 2))"
  fi
  devs="$devs
-netdev
$nd
-device
$dv"
  nnet=$((nnet + 1))
}

add_disk() {
  path=$(get path "$1") ro=$(get readonly "$1") direct=$(get direct "$1") id=$(get id "$1")
  [ -n "$path" ] || die "--disk $1: path=PATH is required"
  [ -n "$id" ] || id=disk$ndisk
  cache=writeback; [ "$direct" = on ] && cache=none
  dr="if=none,id=drv$ndisk,file=$path,format=raw,aio=threads,cache=$cache"
  [ "$ro" = on ] && dr="$dr,readonly=on"
  devs="$devs
-drive
$dr
-device
virtio-blk-pci,drive=drv$ndisk,id=$id,serial=$id"
  ndisk=$((ndisk + 1))
}

add_device() {
  path=$(get path "$1") id=$(get id "$1")
  [ -n "$path" ] || die "--device $1: path=/sys/bus/pci/devices/BDF is required"
  dv="vfio-pci,host=${path##*/},romfile="
  [ -n "$id" ] && dv="$dv,id=$id"
  devs="$devs
-device
$dv"
}

while [ $# -gt 0 ]; do
  case $1 in
    --*=*) opt=${1%%=*} val=${1#*=}; shift ;;
    --*) opt=$1; [ $# -ge 2 ] || die "$1 needs a value"; val=$2; shift 2 ;;
    *) die "unexpected argument '$1'" ;;
  esac
  case $opt in
    --kernel) kernel=$val ;;
    --initramfs) initrd=$val ;;
    --cmdline) cmdline=$val ;;
    --cpus) cpus=$val ;;
    --memory) mem=$val ;;
    --serial) serial=$val ;;
    --net) add_net "$val" ;;
    --disk) add_disk "$val" ;;
    --device) add_device "$val" ;;
    --api-socket) qmp=$val ;;
    *) die "unknown option $opt" ;;
  esac
done
[ -n "$kernel" ] || die "--kernel is required"
case $mem in *[!0-9]*) ;; *) mem=${mem}B ;; esac   # Tandem: bytes; QEMU: MiB without suffix
case $serial in
  stdio) ser=stdio ;;
  off) ser=null ;;
  file=?*) ser=file:${serial#file=} ;;
  *) die "--serial $serial: use stdio, off or file=PATH" ;;
esac

set -- -M "${QEMU_AS_TANDEM_MACHINE:-q35}" -accel kvm -cpu host -smp "$cpus" -m "$mem" \
  -nodefaults -no-user-config -no-reboot -display none -serial "$ser" \
  -kernel "$kernel" -append "$cmdline"
[ -n "$initrd" ] && set -- "$@" -initrd "$initrd"
[ -n "$qmp" ] && set -- "$@" -qmp "unix:$qmp,server=on,wait=off"
IFS='
'
for a in $devs; do set -- "$@" "$a"; done
unset IFS
# shellcheck disable=SC2086  # split on purpose
[ -n "${QEMU_AS_TANDEM_ARGS:-}" ] && set -- "$@" ${QEMU_AS_TANDEM_ARGS}
[ "${QEMU_AS_TANDEM_VERBOSE:-0}" = 1 ] && echo "qemu-as-tandem: qemu-system-x86_64 $*" >&2
exec qemu-system-x86_64 "$@"
