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

bench_setup "$@"

bench_in_l1 net "$RES/bench/net-l1.sh" "$((SECS + 1)) s each way" tx_mbps rx_mbps
echo "net_tx_ratio=$(bench_paired_ratio "$BENCH_LINES" tx_mbps)" "net_rx_ratio=$(bench_paired_ratio "$BENCH_LINES" rx_mbps)"
