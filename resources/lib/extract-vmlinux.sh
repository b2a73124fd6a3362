#!/bin/bash
# extract-vmlinux.sh BZIMAGE OUT — write the ELF vmlinux that is compressed inside a bzImage.
#
# Why: QEMU boots an ELF vmlinux with a PVH note (Xen's PHYS32_ENTRY, present in Debian's
# kernel since it is built with CONFIG_PVH) straight into 32-bit protected mode. Under TCG
# that skips the real-mode setup code and the in-guest decompression of the bzImage, which
# takes L1's boot from ~12 s to ~7 s on 2 cores.
#
# How: the x86 boot protocol (>= 2.08) records where the payload is: setup_sects at 0x1f1
# (the setup code is (setup_sects + 1) * 512 bytes), payload_offset at 0x248 and
# payload_length at 0x24c, both relative to the end of the setup code. The first bytes of
# the payload tell the compressor. Reading the header instead of searching for magic
# numbers means we decompress exactly the kernel and nothing that happens to look like it.
set -euo pipefail
IMG=${1:?usage: extract-vmlinux.sh BZIMAGE OUT}
OUT=${2:?usage: extract-vmlinux.sh BZIMAGE OUT}

u8()  { od -An -tu1 -j "$1" -N1 "$IMG" | tr -d ' '; }
u16() { od -An -tu2 -j "$1" -N2 "$IMG" | tr -d ' '; }
u32() { od -An -tu4 -j "$1" -N4 "$IMG" | tr -d ' '; }

[ "$(dd if="$IMG" bs=1 skip=$((0x202)) count=4 status=none)" = HdrS ] \
  || { echo "extract-vmlinux: $IMG is not a bzImage (no HdrS header)" >&2; exit 1; }
ver=$(u16 $((0x206)))
[ "$ver" -ge $((0x208)) ] \
  || { echo "extract-vmlinux: boot protocol $(printf %x "$ver") < 2.08: no payload fields" >&2; exit 1; }
sects=$(u8 $((0x1f1))); [ "$sects" -ne 0 ] || sects=4
off=$(( (sects + 1) * 512 + $(u32 $((0x248))) ))
len=$(u32 $((0x24c)))
magic=$(od -An -tx1 -j "$off" -N4 "$IMG" | tr -d ' ')
case $magic in
  fd377a58) dec="xz -dc --single-stream" ;;   # the payload ends with a 4-byte size: not xz
  1f8b*)    dec="gzip -dc" ;;
  28b52ffd) dec="zstd -dcq" ;;
  02214c18) dec="lz4 -dc" ;;
  *) echo "extract-vmlinux: unknown payload compression (magic $magic)" >&2; exit 1 ;;
esac
tmp=$OUT.tmp.$$
# The trailing size word makes gzip report "trailing garbage" (exit 2); the ELF check below
# is what decides success.
tail -c +$((off + 1)) "$IMG" | head -c "$len" | $dec > "$tmp" 2>/dev/null || true
if [ "$(head -c4 "$tmp" | od -An -tx1 | tr -d ' ')" != 7f454c46 ]; then
  rm -f "$tmp"; echo "extract-vmlinux: the payload of $IMG did not decompress to an ELF" >&2; exit 1
fi
mv "$tmp" "$OUT"
