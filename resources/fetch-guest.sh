#!/bin/bash
# fetch-guest.sh — the guest kernel and busybox, from Debian's own packages.
#
# Outputs (under resources/cache/):
#   debs/        the downloaded .deb files (the kernel the `linux-image-amd64` metapackage
#                depends on — Debian's generic kernel — and busybox-static)
#   k/           the kernel package unpacked (k/boot/vmlinuz-*, k/lib/modules/*), depmod run
#   bb/bin/busybox  a static busybox
#   vmlinuz      symlink to the bzImage: what Tandem boots (L2)
#   vmlinux-l1   the same kernel as a PVH-bootable ELF: what L0's QEMU boots fast (L1)
#
# The generic kernel (not -cloud) because it has every driver the tests need as modules:
# virtio_pci, virtio_net, net_failover, igb, igbvf, vfio-pci, kvm_amd.
# A second run with the outputs present does nothing and needs no network.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

done_marker=$CACHE/.guest-ok
if [ -e "$done_marker" ] && [ -e "$CACHE/vmlinuz" ] && [ -e "$CACHE/vmlinux-l1" ] \
   && [ -x "$CACHE/bb/bin/busybox" ] && up_to_date "$done_marker" "$0" "$RES/lib/extract-vmlinux.sh"; then
  say "guest kernel and busybox already in $CACHE"
  exit 0
fi
need_cmd apt-get apt-cache dpkg depmod readelf xz od
mkdir -p "$CACHE/debs"
rm -f "$done_marker"

# Which kernel package: whatever linux-image-amd64 depends on today (e.g. linux-image-6.1.0-37-amd64).
kpkg() { apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}'; }
KPKG=$(kpkg || true)
if [ -z "$KPKG" ]; then
  need_root "refreshing the apt lists (apt-get update)"
  say "apt-get update (the package lists do not know linux-image-amd64 yet)"
  apt-get update -qq || die "apt-get update failed: check the machine's apt sources and network"
  KPKG=$(kpkg || true)
  [ -n "$KPKG" ] || die "apt-cache finds no linux-image-amd64: are Debian's main archive sources configured?"
fi

# As root, apt drops to the _apt user to download and warns that it cannot write here.
download() { (cd "$CACHE/debs" && apt-get download -qq -o APT::Sandbox::User=root "$1"); }
for p in "$KPKG" busybox-static; do
  ls "$CACHE/debs/${p}"_*.deb >/dev/null 2>&1 && continue
  say "downloading $p"
  if ! download "$p"; then
    # Old package lists name versions the mirror no longer has: refresh them once.
    need_root "refreshing the apt lists (apt-get update) after a failed download"
    say "download failed; apt-get update and one more try"
    apt-get update -qq || die "apt-get update failed: check the machine's apt sources and network"
    [ "$p" = busybox-static ] || { p=$(kpkg); KPKG=$p; }
    download "$p" || die "apt-get download $p failed: check the network and the apt sources"
  fi
done
cd "$CACHE/debs"
KDEB=$(ls -t "${KPKG}"_*.deb | head -n1)
BDEB=$(ls -t busybox-static_*.deb | head -n1)
cd "$CACHE"

say "unpacking $KDEB"
rm -rf k k.tmp && dpkg -x "debs/$KDEB" k.tmp && mv k.tmp k
rm -rf bb bb.tmp && dpkg -x "debs/$BDEB" bb.tmp && mv bb.tmp bb
[ -x bb/bin/busybox ] || die "busybox-static did not contain bin/busybox"

KVER=$(kver)
# The package's modules.dep is made by its postinst, which dpkg -x does not run.
depmod -b "$CACHE/k" "$KVER"
[ -f "k/boot/vmlinuz-$KVER" ] || die "no k/boot/vmlinuz-$KVER in $KDEB"
ln -sfn "k/boot/vmlinuz-$KVER" vmlinuz

say "extracting the PVH vmlinux for L1"
"$RES/lib/extract-vmlinux.sh" "k/boot/vmlinuz-$KVER" vmlinux-l1
readelf -n vmlinux-l1 | grep -q Xen \
  || die "vmlinux-l1 has no PVH (Xen) ELF note: QEMU could not boot it directly; is this kernel built with CONFIG_PVH?"
touch "$done_marker"
say "guest kernel $KVER ready: $CACHE/vmlinuz, $CACHE/vmlinux-l1, $CACHE/bb/bin/busybox"
