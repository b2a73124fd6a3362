#!/bin/bash
# build-l1.sh — the base initramfs of L1: resources/cache/l1-base.cpio.gz
#   busybox, resources/bed/init.sh as /init
#   modules (with dependencies, insmod'ed in order by /init): L1_MODULES below
#   /l2/vmlinuz, /l2/initrd.gz     the L2 kernel and initramfs
#   /usr/bin/qemu-system-x86_64    Debian 12's QEMU 7.2 from this host, with its libraries
#                                  and firmware: the comparison VMM for the benchmarks and
#                                  the reference L2 VMM to validate the images with
#   /bin/bootmeter                 resources/bed/bootmeter.c, built static here
#   /bin/qmpc                      resources/bed/qmpc.c (a QMP client for QEMU 7.2), built static here
#   /bin/dmapin                    resources/bed/dmapin.c (the kernel's DMA pinning speed), built static here
#   /l2/initrd-tools.gz            the L2 initramfs with iperf3 and blkbench (network/disk tests)
#   /bin/blkbench                  resources/guest/blkbench.c (built by guest/build-l2.sh)
#   /usr/bin/iperf3                Debian 12's, with its libraries (the L1 end of net tests)
#   /sbin/ip                       iproute2's ip (busybox's has no `ip tuntap`), with its
#                                  libraries; call it as /sbin/ip: busybox sh prefers its applet
#   /lib/bed.sh                    resources/bed/lib.sh: helpers for scenarios
#   /lib/l2-script-lib.sh          resources/guest/script-lib.sh: helpers put on script disks
# The VMM under test is not in here: resources/bed/overlay.sh puts it (and a scenario) in a
# second archive that is appended to this one at boot, so a rebuild of Tandem does not
# rebuild this image. Rebuilt only when an input changed.
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"

# kvm_amd: L0's TCG `-cpu max` emulates AMD SVM (with nested paging), not VT-x.
# vfio_pci, vfio_iommu_type1: device passthrough (needs run-l1.sh --iommu).
# igb, igbvf: the emulated SR-IOV NIC (run-l1.sh --igb) and its VFs.
# tun, bridge: tap devices and a bridge for the L2's network.
# pvpanic_mmio: lets L0's QEMU see an L1 kernel panic and exit with an error.
# loop: a block device over a file, for disks opened with O_DIRECT (tmpfs refuses it).
# e1000e: binds the two e1000e functions of run-l1.sh --igb that share an IOMMU group.
L1_MODULES=${L1_MODULES-"kvm_amd vfio_pci vfio_iommu_type1 igb igbvf tun bridge pvpanic_mmio loop e1000e"}

QEMU72=/usr/bin/qemu-system-x86_64
IPERF=/usr/bin/iperf3
IPROUTE=$(command -v ip || true)
# Firmware QEMU 7.2 loads for -M microvm / -M q35 with -kernel (looked up where Debian puts it).
FIRMWARE="bios-256k.bin kvmvapic.bin linuxboot_dma.bin pvh.bin qboot.rom bios-microvm.bin"

OUT=$CACHE/l1-base.cpio.gz
BM=$CACHE/bootmeter
QMPC=$CACHE/qmpc
DMAPIN=$CACHE/dmapin
need_cmd gcc
[ -x "$QEMU72" ] || die "$QEMU72 is missing: run resources/setup-host.sh (installs qemu-system-x86)"
[ -f "$CACHE/l2-initrd.cpio.gz" ] && [ -f "$CACHE/l2-initrd-tools.cpio.gz" ] && [ -x "$CACHE/blkbench" ] \
  || die "no L2 initramfs or blkbench: run resources/guest/build-l2.sh first"
[ -x "$IPERF" ] || die "$IPERF is missing: run resources/setup-host.sh (installs iperf3)"
[ -n "$IPROUTE" ] || die "iproute2's ip is missing: run resources/setup-host.sh"
IPROUTE=$(realpath "$IPROUTE")

if ! up_to_date "$BM" "$RES/bed/bootmeter.c"; then
  gcc -static -O2 -Wall -o "$BM" "$RES/bed/bootmeter.c" \
    || die "building bootmeter failed: is libc6-dev installed (resources/setup-host.sh)?"
fi
if ! up_to_date "$QMPC" "$RES/bed/qmpc.c"; then
  gcc -static -O2 -Wall -o "$QMPC" "$RES/bed/qmpc.c" \
    || die "building qmpc failed: is libc6-dev installed (resources/setup-host.sh)?"
fi
if ! up_to_date "$DMAPIN" "$RES/bed/dmapin.c"; then
  gcc -static -O2 -Wall -o "$DMAPIN" "$RES/bed/dmapin.c" \
    || die "building dmapin failed: is libc6-dev installed (resources/setup-host.sh)?"
fi

STAMP=$CACHE/.l1-modules
if up_to_date "$OUT" "$0" "$RES/bed/init.sh" "$RES/bed/lib.sh" "$RES/guest/script-lib.sh" \
     "$RES/lib" "$BM" "$QMPC" "$DMAPIN" "$CACHE/l2-initrd.cpio.gz" "$CACHE/l2-initrd-tools.cpio.gz" "$CACHE/blkbench" \
     "$CACHE/.guest-ok" "$QEMU72" "$IPERF" "$IPROUTE" && [ "$(cat "$STAMP" 2>/dev/null)" = "$L1_MODULES" ]; then
  say "L1 base initramfs up to date: $OUT"
  exit 0
fi

args=(--modules "$L1_MODULES"
      --file "$CACHE/vmlinuz:/l2/vmlinuz"
      --file "$CACHE/l2-initrd.cpio.gz:/l2/initrd.gz"
      --file "$CACHE/l2-initrd-tools.cpio.gz:/l2/initrd-tools.gz"
      --file "$BM:/bin/bootmeter"
      --file "$QMPC:/bin/qmpc"
      --file "$DMAPIN:/bin/dmapin"
      --file "$CACHE/blkbench:/bin/blkbench"
      --file "$RES/bed/lib.sh:/lib/bed.sh"
      --file "$RES/guest/script-lib.sh:/lib/l2-script-lib.sh"
      --bin "$IPERF:$IPERF"
      --bin "$IPROUTE:/sbin/ip"
      --bin "$QEMU72:$QEMU72")
for fw in $FIRMWARE; do
  found=""
  for d in /usr/share/qemu /usr/share/seabios; do
    [ -e "$d/$fw" ] && { found=$d/$fw; break; }
  done
  [ -n "$found" ] || die "QEMU firmware $fw not found in /usr/share/qemu or /usr/share/seabios (qemu-system-x86 / seabios packages)"
  args+=(--file "$found:/usr/share/qemu/$fw")
done
"$RES/lib/mkinitrd.sh" "$OUT" "$RES/bed/init.sh" "${args[@]}"
echo "$L1_MODULES" > "$STAMP"
