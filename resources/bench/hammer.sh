#!/bin/bash
# bench/hammer.sh [--runs N] [--secs S] — how fast the control socket answers while the
# guest hammers the VMM, Tandem against QEMU 7.2 (a benchmark, not a test). Inside ONE L1 of
# the nested bed (resources/bench/hammer-l1.sh), each round boots one L2 guest per VMM in turn
# (1 vCPU, 256 MiB), which for S seconds (default 5) reads its disk's PCI configuration
# space in a tight loop (/bin/hammer, resources/guest/hammer.c: vCPU exits) while blkbench reads its
# disk 512 bytes at a time with O_DIRECT (queue notifies for the device thread), and L1
# sends one request after another over the VMM's socket: `tandem ctl info`
# against QMP query-status (qmpc), each timed from fork to exit, so a process start is in
# every sample alike. N rounds (default 3), the VMM going first alternating.
# Prints each round, one line per VMM with the medians, then exactly one last line (lower
# is better for Tandem):
#   hammer_p50_ratio=<tandem / qemu> hammer_p99_ratio=<tandem / qemu>
# each the median over the rounds of Tandem's round value / QEMU's. The issue's bound is
# Tandem's hammer_p99_ms under 100 ms.
# TANDEM_BIN=PATH uses that binary instead of building the release one.
# About 4 minutes with the defaults on 2 cores.
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"
. "$RES/bench/common.sh"

BENCH_RUNS_DEFAULT=3
BENCH_GUESTS="one guest at a time"
bench_setup "$@"

bench_in_l1 hammer "$RES/bench/hammer-l1.sh" "$SECS s of hammering" hammer_p50_ms hammer_p99_ms
echo "hammer_p50_ratio=$(bench_paired_ratio "$BENCH_LINES" hammer_p50_ms)" \
  "hammer_p99_ratio=$(bench_paired_ratio "$BENCH_LINES" hammer_p99_ms)"
