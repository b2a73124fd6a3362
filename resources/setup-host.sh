#!/bin/bash
# setup-host.sh — install the Debian 12 packages the image builds and the nested bed need.
# Idempotent: when every package is already installed it does not touch apt at all.
#
#   kmod            depmod/modprobe, to resolve the guest kernel's module dependencies
#   cpio gzip       to pack the initramfs archives
#   xz-utils zstd   to unpack the kernel payload and (if compressed) modules
#   binutils        readelf, to check the PVH note of the extracted L1 kernel
#   gcc libc6-dev   to build bootmeter, a small static C helper that runs inside L1
#   qemu-system-x86 Debian 12's QEMU 7.2: not run on this host, it is carried into L1 as the
#                   comparison VMM for benchmarks and to validate the guest images
#   iproute2        ip netns / ip tuntap, for the network namespace of the --igb bed; its
#                   `ip` is also carried into L1 (busybox's has no `ip tuntap`)
#   iperf3          Debian 12's iperf3, carried (with its libraries) into L1 and into the L2
#                   tools initramfs for the network tests and resources/bench/net.sh
#   debian-archive-keyring  verifies the trixie-backports lists fetch-qemu.sh reads
#   ca-certificates in case the machine's apt sources use https
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

PKGS="kmod cpio gzip xz-utils zstd binutils gcc libc6-dev qemu-system-x86 iproute2 iperf3 \
debian-archive-keyring ca-certificates apt coreutils"

missing=""
for p in $PKGS; do
  s=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$s" = "install ok installed" ] || missing="$missing $p"
done
if [ -z "$missing" ]; then
  say "host packages already installed"
  exit 0
fi
need_root "installing packages ($missing)"
say "installing:$missing"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq || die "apt-get update failed: check the machine's apt sources and network"
# No recommends: qemu-system-x86 would otherwise pull in a desktop's worth of packages.
apt-get install -y -qq --no-install-recommends $missing >/dev/null \
  || die "apt-get install of$missing failed (see apt's messages above)"
say "done"
