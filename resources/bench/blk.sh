#!/bin/bash
# bench/blk.sh [--runs N] [--secs S] — virtio-blk read performance of Tandem against QEMU 7.2
# (a benchmark, not a test). Inside ONE L1 of the nested bed (resources/bench/blk-l1.sh), two L2
# guests run at once, one booted by Tandem and one by QEMU 7.2 (1 vCPU, 512 MiB each), each with
# a readonly virtio-blk disk on the same 256 MiB raw file on L1's tmpfs (and a NIC through which
# L1 drives it). Each guest runs blkbench (resources/guest/blkbench.c: O_DIRECT in the guest,
# one request in flight) for S seconds (default 5): 4 KiB random reads (IOPS) and 1 MiB
# sequential reads (MB/s, 10^6 bytes); after an uncounted warm-up, N rounds (default 6), each
# measuring both VMMs seconds apart (the one going first alternates). QEMU's side is
# resources/bench/qemu-as-tandem.sh: -M q35, virtio-blk-pci, -drive format=raw,aio=threads,
# cache=writeback, i.e. buffered I/O on L1's page cache like Tandem without direct=on. (L1's
# kernel, 6.1, has no O_DIRECT on tmpfs, so neither VMM could bypass that cache here.)
# Prints each round, one line per VMM with the medians, then exactly one last line (higher
# is better for Tandem):
#   blk_randread_ratio=<tandem / qemu IOPS> blk_seq_ratio=<tandem / qemu MB/s>
# each ratio being the median over the rounds of Tandem's value / QEMU's value in the round.
# TANDEM_BIN=PATH uses that binary instead of building the release one
# (TANDEM_BIN=resources/bench/qemu-as-tandem.sh measures QEMU against itself).
# About 3 minutes with the defaults on 2 cores.
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"
. "$RES/bench/common.sh"

bench_setup "$@"

bench_in_l1 blk "$RES/bench/blk-l1.sh" "2 x $SECS s" randread_iops seq_mbps
echo "blk_randread_ratio=$(bench_paired_ratio "$BENCH_LINES" randread_iops)" "blk_seq_ratio=$(bench_paired_ratio "$BENCH_LINES" seq_mbps)"
