#!/bin/bash
# overlay.sh OUT.cpio BIN [HOST_PATH:GUEST_PATH ...]
#
# Builds the second, uncompressed newc archive that run-l1.sh appends to L1's base
# initramfs (Linux unpacks concatenated archives in order, later entries win):
#   BIN                 -> /bin/tandem (the VMM under test); "-" for none
#   its shared libraries, as ldd lists them on this host, each at its own path
#   HOST_PATH:GUEST_PATH  any further file or folder, e.g. tests/scenarios/boot.sh:/scenario.sh
# Needs no root: files are recorded as owned by root whoever builds the archive.
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"

usage="usage: overlay.sh OUT.cpio BIN|- [HOST_PATH:GUEST_PATH ...]"
OUT=${1:?$usage}
BIN=${2:?$usage}
shift 2
need_cmd cpio ldd

ST=$(mktemp -d "${TMPDIR:-/tmp}/tandem-overlay.XXXXXX")
trap 'rm -rf "$ST"' EXIT
chmod 755 "$ST"

put() {  # put HOST GUEST: copy, following symlinks, creating parent folders
  [ -e "$1" ] || die "'$1' does not exist (in: $usage)"
  local g=${2#/}
  [ -n "$g" ] || die "empty guest path for '$1'"
  mkdir -p "$ST/$(dirname "$g")"
  cp -rL "$1" "$ST/$g"
}

if [ "$BIN" != - ]; then
  [ -x "$BIN" ] || die "the VMM binary '$BIN' does not exist or is not executable (cargo build first?)"
  put "$BIN" /bin/tandem
  for l in $(libs_of "$BIN"); do put "$l" "$l"; done
fi
for hg in "$@"; do
  case $hg in *:*) ;; *) die "'$hg' is not HOST_PATH:GUEST_PATH" ;; esac
  put "${hg%%:*}" "${hg#*:}"
done
mkdir -p "$(dirname "$OUT")"
pack_cpio "$ST" > "$OUT.tmp.$$"
mv "$OUT.tmp.$$" "$OUT"
