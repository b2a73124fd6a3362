#!/bin/bash
# build-l2.sh — the L2 guest's initramfs images, blkbench and hammer:
#   resources/cache/l2-initrd.cpio.gz        busybox + resources/guest/init.sh as /init + the
#                                            modules in L2_MODULES (with their dependencies).
#                                            Lean on purpose: boot time is benchmarked with it.
#   resources/cache/l2-initrd-tools.cpio.gz  the same plus the test tools: /usr/bin/iperf3
#                                            (Debian 12's, with its shared libraries, ~8 MB),
#                                            /bin/blkbench and /bin/hammer (resources/bench/
#                                            hammer.sh). For network and disk tests.
#   resources/cache/blkbench                 resources/guest/blkbench.c, built static (it runs
#                                            in L2 and in L1); resources/cache/hammer likewise
# Each is rebuilt only when one of its inputs changed.
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"

# Modules loaded by L2's /init, in this order (dependencies are added automatically):
# virtio over PCI (the transport of Tandem's PCI devices), its net and block drivers, and
# net_failover (virtio_net needs it, for VIRTIO_NET_F_STANDBY). /init skips the modules named
# virtio* and *failover when the guest has no virtio device (see guest/init.sh), igbvf, the
# driver of the igb VFs the VFIO tests pass through, and uio_pci_generic, which lets a test
# script field the INTx of a passed-through QEMU "edu" device (each only when that device
# is there), and pvpanic_mmio, which tells Tandem (or QEMU) that the guest kernel panicked.
L2_MODULES=${L2_MODULES-"virtio_pci virtio_net virtio_blk net_failover igbvf uio_pci_generic pvpanic_mmio"}

IPERF=/usr/bin/iperf3
BB=$CACHE/blkbench
HAMMER=$CACHE/hammer
need_cmd gcc
[ -x "$IPERF" ] || die "$IPERF is missing: run resources/setup-host.sh (installs iperf3)"

if ! up_to_date "$BB" "$RES/guest/blkbench.c"; then
  gcc -static -O2 -Wall -o "$BB.tmp.$$" "$RES/guest/blkbench.c" -lpthread \
    || die "building blkbench failed: is libc6-dev installed (resources/setup-host.sh)?"
  mv "$BB.tmp.$$" "$BB"
fi
if ! up_to_date "$HAMMER" "$RES/guest/hammer.c"; then
  gcc -static -O2 -Wall -o "$HAMMER.tmp.$$" "$RES/guest/hammer.c" \
    || die "building hammer failed: is libc6-dev installed (resources/setup-host.sh)?"
  mv "$HAMMER.tmp.$$" "$HAMMER"
fi

OUT=$CACHE/l2-initrd.cpio.gz
TOOLS=$CACHE/l2-initrd-tools.cpio.gz
STAMP=$CACHE/.l2-modules
inputs=("$0" "$RES/guest/init.sh" "$RES/lib" "$CACHE/.guest-ok")
same_modules() { [ "$(cat "$STAMP" 2>/dev/null)" = "$L2_MODULES" ]; }
if up_to_date "$OUT" "${inputs[@]}" && same_modules; then
  say "L2 initramfs up to date: $OUT"
else
  "$RES/lib/mkinitrd.sh" "$OUT" "$RES/guest/init.sh" --modules "$L2_MODULES"
  rm -f "$STAMP"   # the tools image is stale too
fi
if up_to_date "$TOOLS" "${inputs[@]}" "$BB" "$HAMMER" "$IPERF" && same_modules; then
  say "L2 tools initramfs up to date: $TOOLS"
else
  "$RES/lib/mkinitrd.sh" "$TOOLS" "$RES/guest/init.sh" --modules "$L2_MODULES" \
    --file "$BB:/bin/blkbench" --file "$HAMMER:/bin/hammer" --bin "$IPERF:$IPERF"
fi
echo "$L2_MODULES" > "$STAMP"
