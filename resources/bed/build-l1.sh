#!/bin/bash
# build-l1.sh — the base initramfs of L1: resources/cache/l1-base.cpio.gz
#   busybox, resources/bed/init.sh as /init
#   modules (with dependencies, insmod'ed in order by /init): L1_MODULES below
#   /l2/vmlinuz, /l2/initrd.gz     the L2 kernel and initramfs
#   /usr/bin/qemu-system-x86_64    Debian 12's QEMU 7.2 from this host, with its libraries
#                                  and firmware: the comparison VMM for the benchmarks and
#                                  the reference L2 VMM to validate the images with
#   /bin/bootmeter                 resources/bed/bootmeter.c, built static here
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
L1_MODULES=${L1_MODULES-"kvm_amd vfio_pci vfio_iommu_type1 igb igbvf tun bridge pvpanic_mmio"}

QEMU72=/usr/bin/qemu-system-x86_64
# Firmware QEMU 7.2 loads for -M microvm / -M q35 with -kernel (looked up where Debian puts it).
FIRMWARE="bios-256k.bin kvmvapic.bin linuxboot_dma.bin pvh.bin qboot.rom bios-microvm.bin"

OUT=$CACHE/l1-base.cpio.gz
BM=$CACHE/bootmeter
need_cmd gcc
[ -x "$QEMU72" ] || die "$QEMU72 is missing: run resources/setup-host.sh (installs qemu-system-x86)"
[ -f "$CACHE/l2-initrd.cpio.gz" ] || die "no L2 initramfs: run resources/guest/build-l2.sh first"

if ! up_to_date "$BM" "$RES/bed/bootmeter.c"; then
  gcc -static -O2 -Wall -o "$BM" "$RES/bed/bootmeter.c" \
    || die "building bootmeter failed: is libc6-dev installed (resources/setup-host.sh)?"
fi

STAMP=$CACHE/.l1-modules
if up_to_date "$OUT" "$0" "$RES/bed/init.sh" "$RES/lib" "$BM" "$CACHE/l2-initrd.cpio.gz" \
     "$CACHE/.guest-ok" "$QEMU72" && [ "$(cat "$STAMP" 2>/dev/null)" = "$L1_MODULES" ]; then
  say "L1 base initramfs up to date: $OUT"
  exit 0
fi

args=(--modules "$L1_MODULES"
      --file "$CACHE/vmlinuz:/l2/vmlinuz"
      --file "$CACHE/l2-initrd.cpio.gz:/l2/initrd.gz"
      --file "$BM:/bin/bootmeter"
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
