#!/bin/bash
# fetch-qemu.sh — the QEMU that runs L1 (on this host, under TCG): 11.x from Debian
# trixie-backports, unpacked privately into resources/cache/qemu/ and NOT installed, so the
# host stays a plain Debian 12. Run it through resources/cache/qemu/qemu.
#
# Why not Debian 12's QEMU (7.2): it has no igb (the SR-IOV NIC of the bed), and 10.0.x
# from bookworm-backports has igb but never maps the VFs' BARs. 11.x works.
#
# The trixie packages need trixie's glibc, so the wrapper starts QEMU through the unpacked
# dynamic loader with the unpacked libraries first on the search path.
#
# The mirror is whatever this machine's apt already uses (read from its sources, or from
# $TANDEM_DEBIAN_MIRROR): no host name is written in the repository.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

DEST=$CACHE/qemu
if [ -x "$DEST/qemu" ] && up_to_date "$DEST/qemu" "$0"; then
  say "L0 QEMU already there: $DEST/qemu"
  exit 0
fi
need_cmd apt-get dpkg awk

# The URI of the machine's main Debian archive: the source that serves the host's own
# release (e.g. "bookworm"), not -security or a third-party repository. Both the deb822
# (*.sources) and the one-line (sources.list) formats are read.
mirror() {
  local codename
  codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
  {
    for f in /etc/apt/sources.list.d/*.sources; do
      [ -f "$f" ] || continue
      # One deb822 stanza per paragraph: print "URI SUITE..." for stanzas of type deb.
      awk 'BEGIN{RS=""; FS="\n"} {
             t=""; u=""; s="";
             for (i = 1; i <= NF; i++) {
               if ($i ~ /^Types:/)  t = $i;
               if ($i ~ /^URIs:/)   { u = $i; sub(/^URIs:[ \t]*/, "", u) }
               if ($i ~ /^Suites:/) { s = $i; sub(/^Suites:[ \t]*/, "", s) }
             }
             if (t ~ /(^|[ \t])deb([ \t]|$)/ && u != "") print u, s
           }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
      [ -f "$f" ] || continue
      # "deb [options] URI suite components"
      awk '$1=="deb" { i=2; if ($2 ~ /^\[/) { while ($i !~ /\]$/) i++; i++ } print $i, $(i+1) }' "$f"
    done
  } | awk -v c="$codename" '{ for (i = 2; i <= NF; i++) if ($i == c) { print $1; exit } }'
}
URI=${TANDEM_DEBIAN_MIRROR:-$(mirror)}
[ -n "$URI" ] || die "found no Debian archive for this release in /etc/apt/sources*; set TANDEM_DEBIAN_MIRROR to a Debian mirror URI"
URI=${URI%/}

KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
[ -f "$KEYRING" ] || die "$KEYRING is missing: run resources/setup-host.sh (debian-archive-keyring)"

# A private apt: its own sources, lists, package cache and an empty dpkg status, so that
# nothing of the host's apt state is read or changed. The machine's apt.conf.d (proxy
# settings and the like) still applies.
A=$DEST/.apt
rm -rf "$DEST/root" "$DEST/qemu"
mkdir -p "$A/lists/partial" "$A/archives/partial" "$A/etc"
: > "$A/status"
printf 'deb [signed-by=%s] %s trixie main\ndeb [signed-by=%s] %s trixie-backports main\n' \
  "$KEYRING" "$URI" "$KEYRING" "$URI" > "$A/etc/sources.list"
APT=(apt-get -q -o Dir::State::Lists="$A/lists" -o Dir::State::status="$A/status"
     -o Dir::Cache="$A" -o Dir::Cache::archives="$A/archives"
     -o Dir::Etc::SourceList="$A/etc/sources.list" -o Dir::Etc::SourceParts=/nonexistent
     -o APT::Architecture=amd64 -o APT::Architectures::=amd64 -o Debug::NoLocking=1
     -o APT::Sandbox::User=root
     # With an empty status file apt would otherwise add every Essential package.
     -o pkgCacheGen::Essential=none)
say "reading the trixie and trixie-backports package lists"
"${APT[@]}" -qq update || die "apt-get update of trixie-backports failed: check the network and $A/etc/sources.list"
say "downloading qemu-system-x86 from trixie-backports and its dependencies"
"${APT[@]}" -qq -y --download-only --no-install-recommends -t trixie-backports \
  install qemu-system-x86 >/dev/null || die "downloading qemu-system-x86 from trixie-backports failed"

R=$DEST/root
mkdir -p "$R"
for d in "$A"/archives/*.deb; do dpkg -x "$d" "$R"; done
LIB=$R/usr/lib/x86_64-linux-gnu
[ -x "$R/usr/bin/qemu-system-x86_64" ] || die "no usr/bin/qemu-system-x86_64 in the unpacked packages"
[ -e "$LIB/ld-linux-x86-64.so.2" ] || die "no dynamic loader in the unpacked packages (libc6 missing?)"

# QEMU looks for its modules and firmware under "<dir of the running executable>/qemu-bundle"
# + its configured path (/usr/lib/x86_64-linux-gnu/qemu, /usr/share/qemu, ...) when that
# folder exists, else at the configured path itself, i.e. in the host's own QEMU 7.2, whose
# modules make QEMU 11 abort ("Only modules from the same build can be loaded"). Started
# through the dynamic loader, the running executable is ld-linux-x86-64.so.2, so the bundle
# link goes beside it and points back to the root of the unpacked tree.
ln -sfn ../../.. "$LIB/qemu-bundle"

# The wrapper finds everything relative to itself, so the cache may be moved.
cat > "$DEST/qemu.tmp" <<'WRAP'
#!/bin/sh
# QEMU 11 from trixie-backports (unpacked by resources/fetch-qemu.sh), run with its own
# loader and libraries, its own modules and firmware.
R=$(dirname "$(readlink -f "$0")")/root
L=$R/usr/lib/x86_64-linux-gnu
export QEMU_MODULE_DIR=$L/qemu
exec "$L/ld-linux-x86-64.so.2" --library-path "$L:$R/lib/x86_64-linux-gnu" \
  "$R/usr/bin/qemu-system-x86_64" -L "$R/usr/share/qemu" -L "$R/usr/share/seabios" \
  -L "$R/usr/lib/ipxe/qemu" "$@"
WRAP
chmod +x "$DEST/qemu.tmp"
v=$("$DEST/qemu.tmp" --version | head -n1) || die "the unpacked QEMU does not run (missing library?)"
case $v in *"version 1"[1-9].*) ;; *) die "expected QEMU 11.x, got: $v" ;; esac
"$DEST/qemu.tmp" -device help 2>&1 | grep -q '"igb"' \
  || die "the unpacked QEMU has no igb device or cannot list its devices (a module from another build?)"
mv "$DEST/qemu.tmp" "$DEST/qemu"
rm -rf "$A/archives" "$A/lists"    # keep the cache small: only the unpacked tree is needed
say "L0 QEMU ready: $DEST/qemu ($v)"
