#!/bin/bash
# bench/net.sh [--runs N] [--secs S] — virtio-net throughput of Tandem against QEMU 7.2 (a
# benchmark, not a test). Inside ONE L1 of the nested bed (resources/bench/net-l1.sh), two L2
# guests run at once, one booted by Tandem and one by QEMU 7.2 (1 vCPU, 512 MiB each), each with
# a virtio-net NIC on its own tap in L1. L1 drives them over the taps: each guest runs iperf3
# against an iperf3 server on its tap's L1 address, S seconds (default 3, plus 1 s of slow
# start not counted), guest -> L1 then L1 -> guest; after an uncounted warm-up, N rounds
# (default 6), each measuring both VMMs seconds apart (the one going first alternates), so
# that the bed's slow drifts hit both alike. QEMU's side is resources/bench/qemu-as-tandem.sh:
# -M q35, virtio-net-pci, tap with vhost=off (userspace virtio like Tandem's).
#   tx = guest -> L1, rx = L1 -> guest, both the iperf3 receiver's Mbit/s.
# Prints each round, one line per VMM with the medians, then exactly one last line (higher
# is better for Tandem):
#   net_tx_ratio=<tandem / qemu> net_rx_ratio=<tandem / qemu>
# each ratio being the median over the rounds of Tandem's value / QEMU's value in the round.
# TANDEM_BIN=PATH uses that binary instead of building the release one
# (TANDEM_BIN=resources/bench/qemu-as-tandem.sh measures QEMU against itself).
# About 3 minutes with the defaults on 2 cores.
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"
. "$RES/bench/common.sh"

bench_args "$@"
"$RES/build-images.sh" >&2
bench_tandem

W=$(mktemp -d "${TMPDIR:-/tmp}/tandem-bench-net.XXXXXX")
trap 'rm -rf "$W"' EXIT
"$RES/bed/overlay.sh" "$W/overlay.cpio" "$TANDEM" "$RES/bench/net-l1.sh:/scenario.sh" \
  "$RES/bench/qemu-as-tandem.sh:/bin/qemu-as-tandem"
LOG=$CACHE/bench-net-l1.log
say "$RUNS rounds of $((SECS + 1)) s each way per VMM, both guests up at once in one L1; L1 log: $LOG"
rc=0
"$RES/bed/run-l1.sh" --mem 3072 --timeout $((RUNS * 60 + 900)) \
  --append "tandem.bench_runs=$RUNS tandem.bench_secs=$SECS" "$W/overlay.cpio" "$LOG" || rc=$?
tr -d '\r' < "$LOG" | grep -E '^BENCH ' > "$W/bench" || true
tr -d '\r' < "$LOG" | grep -E '^(--- |  \| )' || true
cat "$W/bench"

ok=1
for vmm in tandem qemu; do
  n=$(grep -c "^BENCH vmm=$vmm .* rc=0$" "$W/bench" || true)
  bad=$(grep "^BENCH vmm=$vmm " "$W/bench" | grep -c -E ' rc=[1-9]|_mbps=0 ' || true)
  [ "$n" -gt 0 ] && [ "$bad" = 0 ] || ok=0
  printf '%-6s rounds_ok=%s tx_median_mbps=%s rx_median_mbps=%s\n' "$vmm" "$n" \
    "$(bench_median "$W/bench" $vmm tx_mbps)" "$(bench_median "$W/bench" $vmm rx_mbps)"
done
[ $ok = 1 ] && [ $rc = 0 ] || die "not every run measured both directions with the VMM exiting 0 (L0 QEMU rc=$rc); see above and $LOG"
echo "net_tx_ratio=$(bench_paired_ratio "$W/bench" tx_mbps)" "net_rx_ratio=$(bench_paired_ratio "$W/bench" rx_mbps)"
