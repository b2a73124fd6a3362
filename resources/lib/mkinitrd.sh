#!/bin/bash
# mkinitrd.sh OUT INIT [--modules "NAME..."] [--file HOST:GUEST]... [--bin HOST:GUEST]...
#             [--compress gzip|none]
#
# Builds a busybox initramfs for the guest kernel in resources/cache/k:
#   /bin/busybox and a symlink for each of its applets (made here, so /init does not spend
#                guest time on `busybox --install`)
#   /dev/console, /dev/null  (the kernel opens /dev/console for /init before devtmpfs is
#                mounted; without it /init has no stdout)
#   /init        the INIT script
#   /modules/NAME.ko and /modules/order: the listed modules and everything they depend on,
#                in load order (resolved with modprobe --show-depends against the unpacked
#                kernel's modules.dep). /init insmods them in that order; busybox's modprobe
#                is not used so that no modules.dep has to be in the image.
#   --file HOST:GUEST  a file copied in (symlinks followed; replaces a busybox applet link of
#                      the same path)
#   --bin HOST:GUEST   a program copied in plus every shared library ldd lists for it, each
#                      at its own path (the dynamic loader has no ld.so.cache in the guest and
#                      falls back to the standard multiarch folders, which is where they are)
# Needs root: mknod for /dev/console.
set -euo pipefail
. "$(dirname "$0")/common.sh"

OUT=${1:?usage: mkinitrd.sh OUT INIT [--modules LIST] [--file H:G]... [--bin H:G]... [--compress gzip|none]}
INIT=${2:?usage: mkinitrd.sh OUT INIT ...}
shift 2
MODULES="" FILES=() BINS=() COMPRESS=gzip
while [ $# -gt 0 ]; do
  case $1 in
    --modules)  MODULES=$2; shift 2 ;;
    --file)     FILES+=("$2"); shift 2 ;;
    --bin)      BINS+=("$2"); shift 2 ;;
    --compress) COMPRESS=$2; shift 2 ;;
    *) die "unknown option '$1'" ;;
  esac
done
need_root "building an initramfs (mknod /dev/console)"
need_cmd cpio gzip modprobe ldd
BB=$CACHE/bb/bin/busybox
[ -x "$BB" ] || die "no busybox at $BB: run resources/fetch-guest.sh first"
KVER=$(kver)
[ -f "$INIT" ] || die "no init script $INIT"

ST=$(mktemp -d "${TMPDIR:-/tmp}/tandem-initrd.XXXXXX")
trap 'rm -rf "$ST"; rm -f "${TMP_OUT:-}"' EXIT
chmod 755 "$ST"
mkdir -p "$ST"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,run,etc,root,modules}
chmod 1777 "$ST/tmp"
cp "$BB" "$ST/bin/busybox"
for a in $("$BB" --list-full); do
  [ "$a" = bin/busybox ] || [ -e "$ST/$a" ] || ln -s /bin/busybox "$ST/$a"
done
mknod -m 600 "$ST/dev/console" c 5 1
mknod -m 666 "$ST/dev/null" c 1 3
cp "$INIT" "$ST/init"; chmod 755 "$ST/init"

# Modules, dependencies first, each once.
: > "$ST/modules/order"
for m in $MODULES; do
  deps=$(modprobe -d "$CACHE/k" -S "$KVER" --show-depends "$m" 2>&1) \
    || die "module '$m' not found in kernel $KVER: $deps"
  for f in $(awk '$1 == "insmod" {print $2}' <<<"$deps"); do
    b=$(basename "$f"); b=${b%.xz}; b=${b%.zst}; b=${b%.ko}
    grep -qx "$b" "$ST/modules/order" && continue
    case $f in
      *.xz)  xz -dc "$f" > "$ST/modules/$b.ko" ;;
      *.zst) zstd -qdc "$f" > "$ST/modules/$b.ko" ;;
      *)     cp "$f" "$ST/modules/$b.ko" ;;
    esac
    echo "$b" >> "$ST/modules/order"
  done
done

put() {  # put HOST GUEST
  [ -e "$1" ] || die "file to put in the initramfs does not exist: $1"
  mkdir -p "$ST/$(dirname "$2")"
  # A busybox applet link may be there already (e.g. /sbin/ip): replace it, never write
  # through it (its target, /bin/busybox, would resolve on the build host).
  rm -f "$ST/$2"
  cp -L "$1" "$ST/$2"
}
for fg in ${FILES[@]+"${FILES[@]}"}; do put "${fg%%:*}" "${fg#*:}"; done
for bg in ${BINS[@]+"${BINS[@]}"}; do
  put "${bg%%:*}" "${bg#*:}"
  for l in $(libs_of "${bg%%:*}"); do [ -e "$ST/$l" ] || put "$l" "$l"; done
done

mkdir -p "$(dirname "$OUT")"
# A temporary name of our own, renamed into place: a reader (or a second build running at
# the same time) never sees a half-written archive.
TMP_OUT=$OUT.tmp.$$
case $COMPRESS in
  gzip) pack_cpio "$ST" | gzip -6 > "$TMP_OUT" ;;
  none) pack_cpio "$ST" > "$TMP_OUT" ;;
  *) die "--compress must be gzip or none" ;;
esac
mv "$TMP_OUT" "$OUT"
say "built $OUT ($(( $(stat -c %s "$OUT") / 1024 )) KiB), modules: $(tr '\n' ' ' < "$ST/modules/order")"
