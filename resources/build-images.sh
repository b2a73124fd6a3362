#!/bin/bash
# build-images.sh — everything the tests and the nested bed need, into resources/cache/:
# host packages, the guest kernel and busybox, L0's QEMU 11, the L2 initramfs and L1's base
# initramfs. Each step skips itself when its outputs are there and up to date, so a second
# run takes well under a second and needs no network.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

# One build at a time: tests and benchmarks started together would otherwise rebuild the
# same files at once.
mkdir -p "$CACHE"
exec 9>"$CACHE/.build-lock"
flock 9
SECONDS=0
"$RES/setup-host.sh"
"$RES/fetch-guest.sh"
"$RES/fetch-qemu.sh"
"$RES/guest/build-l2.sh"
"$RES/bed/build-l1.sh"
say "images ready in $CACHE (${SECONDS}s)"
