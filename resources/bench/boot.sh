#!/bin/bash
# bench/boot.sh [--runs N] — boot time and memory of Tandem against QEMU (a benchmark, not
# a test). Inside ONE L1 of the nested bed, boots the same L2 alternately with the release
# tandem and with Debian 12's QEMU 7.2 (-M microvm,rtc=on -accel kvm), N times each
# (default 5), 512 MiB, 1 vCPU, command line "console=ttyS0 panic=-1 quiet", from both
# forms of the same Debian kernel: the bzImage and the vmlinux inside it (see boot-l1.sh).
# The headline ratio compares each VMM's fastest form (the vmlinux for both: the guest
# then skips decompressing itself, which is ~40% of a bzImage boot under nesting); the
# bzImage ratio is printed too.
#
# Measured per boot by bootmeter (resources/bed/bootmeter.c), with L1's clock:
#   boot   VMM start (fork) -> the guest's TANDEM-L2-INIT line
#   rss    the VMM's peak resident set (VmHWM) up to the init line minus the resident part
#          of the guest RAM mapping (the largest anonymous mapping, from smaps) then, both
#          read while the VMM is stopped on that line. The guest's own pages count for
#          neither VMM: this is what the VMM costs on top of the memory its guest touched.
#          Also printed, as rss_whole_run: the peak over the whole run (ru_maxrss) minus
#          the guest RAM of the last sample, which can count guest pages the guest touched
#          after that sample (a 2 MiB huge page at a time), so it is noisier and higher.
# Prints medians, then exactly one last line:
#   boot_ratio=<tandem / qemu, vmlinux> boot_ratio_bzimage=<tandem / qemu, bzImage>
#     tandem_rss_overhead_kib=<median for tandem, vmlinux, at the init line>
# TANDEM_BIN=PATH uses that binary instead of building the release one.
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"
. "$RES/bench/common.sh"

RUNS=5
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=${2:?usage: boot.sh [--runs N]}; shift 2 ;;
    *) die "usage: boot.sh [--runs N]" ;;
  esac
done
case $RUNS in ''|*[!0-9]*|0) die "--runs takes a number > 0" ;; esac

"$RES/build-images.sh" >&2
bench_tandem

W=$(mktemp -d "${TMPDIR:-/tmp}/tandem-bench.XXXXXX")
trap 'rm -rf "$W"' EXIT
"$RES/bed/overlay.sh" "$W/overlay.cpio" "$TANDEM" "$RES/bench/boot-l1.sh:/scenario.sh" \
  "$CACHE/vmlinux-l1:/l2/vmlinux"
LOG=$CACHE/bench-boot-l1.log
say "$RUNS boots of each VMM and kernel form inside one L1 (about $((RUNS * 40 + 20)) s); L1 log: $LOG"
rc=0
"$RES/bed/run-l1.sh" --timeout $((RUNS * 4 * 200 + 120)) --append "tandem.bench_runs=$RUNS" \
  "$W/overlay.cpio" "$LOG" || rc=$?
tr -d '\r' < "$LOG" | grep -E '^BENCH ' > "$W/bench" || true
tr -d '\r' < "$LOG" | grep -E '^(--- |  \| )' || true
cat "$W/bench"

# median VMM KERNEL FIELD : median of FIELD over the runs of VMM booting KERNEL (the mean of
# the two middle ones for an even count). "overhead" is at_marker_hwm_kib -
# at_marker_guest_rss_kib, "overhead_whole_run" hwm_kib - guest_rss_kib.
median() {
  awk -v vmm="$1" -v kern="$2" -v f="$3" '
    $2 == "vmm=" vmm && $3 == "kernel=" kern {
      for (i = 4; i <= NF; i++) { split($i, kv, "="); v[kv[1]] = kv[2] }
      if (f == "overhead") x = v["at_marker_hwm_kib"] - v["at_marker_guest_rss_kib"]
      else if (f == "overhead_whole_run") x = v["hwm_kib"] - v["guest_rss_kib"]
      else x = v[f]
      print x
    }' "$W/bench" | sort -g | awk '{a[NR] = $1} END {
      if (NR == 0) { print "nan"; exit }
      if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}
ok=1
for kernel in vmlinux bzimage; do
  for vmm in tandem qemu; do
    sel="vmm=$vmm kernel=$kernel "
    n=$(grep -c "$sel.*status=0 killed=0" "$W/bench" || true)
    bad=$(grep "$sel" "$W/bench" | grep -c -v "status=0 killed=0" || true)
    bad2=$(grep -c "$sel.*marker_ms=-1" "$W/bench" || true)
    [ "$bad" = 0 ] && [ "$bad2" = 0 ] && [ "$n" -gt 0 ] || ok=0
    printf '%-6s %-7s runs_ok=%s boot_median_ms=%s hwm_median_kib=%s guest_rss_median_kib=%s rss_overhead_median_kib=%s rss_whole_run_overhead_median_kib=%s\n' \
      "$vmm" "$kernel" "$n" "$(median $vmm $kernel marker_ms)" "$(median $vmm $kernel at_marker_hwm_kib)" \
      "$(median $vmm $kernel at_marker_guest_rss_kib)" "$(median $vmm $kernel overhead)" \
      "$(median $vmm $kernel overhead_whole_run)"
  done
done
[ $ok = 1 ] && [ $rc = 0 ] || die "not every boot reached TANDEM-L2-INIT with the VMM exiting 0 (L0 QEMU rc=$rc); see above and $LOG"
awk -v t="$(median tandem vmlinux marker_ms)" -v q="$(median qemu vmlinux marker_ms)" \
  -v tb="$(median tandem bzimage marker_ms)" -v qb="$(median qemu bzimage marker_ms)" \
  -v o="$(median tandem vmlinux overhead)" \
  'BEGIN { printf "boot_ratio=%.3f boot_ratio_bzimage=%.3f tandem_rss_overhead_kib=%d\n", t / q, tb / qb, o }'
