#!/bin/bash
# bench/vfio.sh [--runs N] — SR-IOV VF passthrough, Tandem against QEMU 7.2 (a benchmark, not
# a test). Inside ONE L1 of the nested bed with an emulated Intel IOMMU and an igb NIC
# (run-l1.sh --iommu --igb; resources/bench/vfio-l1.sh), one VF goes in turn to a Tandem
# guest (--vf pf=...,index=0: Tandem binds it to vfio-pci itself) and to a QEMU guest
# (-device vfio-pci,host=BDF on -M q35, the VF bound for it beforehand): 1 vCPU, 512 MiB,
# `quiet`. Measured on L1's clock by bootmeter: the VMM's start to the guest's line after
# igbvf probed the VF. Tandem also reports the time to pin its guest RAM for DMA (as GiB/s;
# anonymous memory, and 2 MiB huge pages with --memory size=512M,hugepages=on) and to
# attach the VF. Under TCG every figure is slow in absolute terms; the probe ratio is the
# comparison, the GiB/s the pinning speed of L1's kernel as Tandem drives it, beside the
# same kernel's speed with nothing but one VFIO_IOMMU_MAP_DMA of as much fresh memory
# (resources/bed/dmapin.c). And the hot path: the VF plugged into a running guest through
# each VMM's control socket (see vfio-l1.sh). The two lines before the last:
#   kernel_pin_gib_s=<x> kernel_pin_hugepages_gib_s=<x> dma_vs_kernel=<tandem / kernel>
#     dma_hugepages_vs_kernel=<tandem / kernel>
#   hot_attach_ratio=<tandem / qemu> hot_attach_ms=<tandem> qemu_hot_attach_ms=<qemu>
# Last line:
#   vf_probe_ratio=<tandem / qemu, lower is better> dma_map_gib_s=<x> dma_map_hugepages_gib_s=<x>
# each the median over the rounds (the ratio: of each round's Tandem / QEMU).
# TANDEM_BIN=PATH uses that binary instead of building the release one.
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"
. "$RES/bench/common.sh"

bench_setup "$@"

BENCH_L1_ARGS="--iommu --igb"
bench_in_l1 vfio "$RES/bench/vfio-l1.sh" "3 boots" probe_ms attach_ms
kpin=$(bench_median "$BENCH_LINES" kernel pin_gib_s) khuge=$(bench_median "$BENCH_LINES" kernel pin_huge_gib_s)
tpin=$(bench_median "$BENCH_LINES" tandem dma_gib_s) thuge=$(bench_median "$BENCH_LINES" tandem dma_huge_gib_s)
awk -v kp="$kpin" -v kh="$khuge" -v tp="$tpin" -v th="$thuge" 'BEGIN {
  printf "kernel_pin_gib_s=%s kernel_pin_hugepages_gib_s=%s dma_vs_kernel=%.2f dma_hugepages_vs_kernel=%.2f\n",
    kp, kh, (kp > 0 ? tp / kp : 0), (kh > 0 ? th / kh : 0) }'
echo "hot_attach_ratio=$(bench_paired_ratio "$BENCH_LINES" hot_attach_ms)" \
  "hot_attach_ms=$(bench_median "$BENCH_LINES" tandem hot_attach_ms)" \
  "qemu_hot_attach_ms=$(bench_median "$BENCH_LINES" qemu hot_attach_ms)"
echo "vf_probe_ratio=$(bench_paired_ratio "$BENCH_LINES" probe_ms)" \
  "dma_map_gib_s=$(bench_median "$BENCH_LINES" tandem dma_gib_s)" \
  "dma_map_hugepages_gib_s=$(bench_median "$BENCH_LINES" tandem dma_huge_gib_s)"
