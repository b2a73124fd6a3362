# Shared by the scripts under resources/: paths, messages, small checks.
# shellcheck shell=bash
# Sourced, not run. Every script sets `set -euo pipefail` itself before sourcing this.

# The repository root and the cache. The cache is git-ignored; everything downloaded or
# built by resources/ lands there so that a second run finds it and does nothing.
RES=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ROOT=$(cd "$RES/.." && pwd)
CACHE=$RES/cache

# Prefix messages with the script's name so that a long build log says who spoke.
_me=$(basename "$0")
say() { echo "[$_me] $*" >&2; }
die() { echo "[$_me] error: $*" >&2; exit 1; }

need_root() {
  [ "$(id -u)" = 0 ] || die "$1 needs root (run it with sudo, or as root)"
}

need_cmd() {
  local c
  for c in "$@"; do
    command -v "$c" >/dev/null 2>&1 || die "'$c' is missing: run resources/setup-host.sh (as root) first"
  done
}

# up_to_date OUT INPUT... : true when OUT exists and no INPUT (file or folder, searched
# recursively) was modified after it. Lets the build steps skip work on a second run while
# still rebuilding when one of our own scripts changed.
up_to_date() {
  local out=$1; shift
  [ -e "$out" ] || return 1
  [ -z "$(find "$@" -newer "$out" -print -quit 2>/dev/null)" ]
}

# The version of the unpacked guest kernel (one folder under cache/k/lib/modules).
kver() {
  local d
  d=$(ls "$CACHE/k/lib/modules" 2>/dev/null | head -n1)
  [ -n "$d" ] || die "no guest kernel in $CACHE/k: run resources/fetch-guest.sh first"
  echo "$d"
}

# libs_of BIN... : the shared libraries (and the dynamic loader) the binaries load, one
# absolute path per line, as ldd reports them on this host. Nothing for static binaries.
libs_of() {
  local b
  for b in "$@"; do
    ldd "$b" 2>/dev/null | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' || true
  done | sort -u
}

# pack_cpio DIR : write DIR as a newc cpio archive to stdout, every entry owned by root
# (so an archive built by a normal user still gives root-owned files in the guest).
pack_cpio() {
  (cd "$1" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet)
}
