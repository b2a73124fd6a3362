#!/bin/bash
# build-l2.sh — the L2 guest's initramfs: resources/cache/l2-initrd.cpio.gz
# busybox + resources/guest/init.sh as /init + the modules in L2_MODULES (with their
# dependencies). Later work adds e.g. "virtio_pci virtio_net net_failover igbvf".
# Rebuilt only when an input changed.
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"

# Modules loaded by L2's /init, in this order (dependencies are added automatically).
L2_MODULES=${L2_MODULES-""}

OUT=$CACHE/l2-initrd.cpio.gz
STAMP=$CACHE/.l2-modules
if up_to_date "$OUT" "$0" "$RES/guest/init.sh" "$RES/lib" "$CACHE/.guest-ok" \
   && [ "$(cat "$STAMP" 2>/dev/null)" = "$L2_MODULES" ]; then
  say "L2 initramfs up to date: $OUT"
  exit 0
fi
"$RES/lib/mkinitrd.sh" "$OUT" "$RES/guest/init.sh" --modules "$L2_MODULES"
echo "$L2_MODULES" > "$STAMP"
