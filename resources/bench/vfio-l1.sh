# shellcheck shell=dash
# L1 scenario of resources/bench/vfio.sh (run-l1.sh --iommu --igb): an igb VF passed through,
# Tandem (/bin/tandem --vf) against QEMU 7.2 (/bin/qemu-as-tandem --device, i.e. -device
# vfio-pci,host=BDF on -M q35; QEMU does not bind devices, so L1 binds the VF to vfio-pci for
# it, outside its timing, while Tandem's time includes doing that itself).
#
# One VF, made by L1 (autoprobe off: it stays unbound between runs). Each guest: 1 vCPU,
# 512 MiB, the lean initramfs, `quiet`; its /init loads igbvf, whose probe of the VF is
# synchronous, then prints TANDEM-L2-INIT and powers off. bootmeter times, on L1's clock,
# the VMM's start to that line. Tandem also reports how long pinning guest RAM for DMA took
# and how long attaching the VF took, once with anonymous RAM and once with 2 MiB huge pages.
# RUNS rounds (tandem.bench_runs), in each: tandem, qemu, tandem with hugepages=on, the order
# of the first two alternating. Output, one line per round and VMM (rc: the run's status):
#   BENCH vmm=tandem run=<i> probe_ms=<ms> attach_ms=<ms> dma_gib_s=<x> dma_huge_gib_s=<x> huge_probe_ms=<ms> rc=<n>
#   BENCH vmm=qemu run=<i> probe_ms=<ms> rc=<n>
#   BENCH vmm=kernel run=<i> pin_gib_s=<x> pin_huge_gib_s=<x> rc=<n>
# The last is the baseline of the DMA figures: dmapin (resources/bed/dmapin.c) maps as much
# fresh memory for the same VF with one VFIO_IOMMU_MAP_DMA and nothing else, i.e. the
# pinning speed of L1's kernel.
. /lib/bed.sh
. /lib/bench-l1.sh
bench_settings
PF=$(igb_pf_up 10.98.0.2/24) || exit 1
PFD=/sys/class/net/$PF/device
echo 0 > $PFD/sriov_drivers_autoprobe
echo 1 > $PFD/sriov_numvfs
VF=$(basename "$(readlink $PFD/virtfn0)")
echo 300 > /proc/sys/vm/nr_hugepages
ARGS="--kernel $L2_KERNEL --initramfs $L2_INITRD --cpus 1"
CMD="console=ttyS0 panic=-1 quiet tandem.action=poweroff"

# boot VMM ARGS... : bootmeter's line, with the VMM's stderr in /tmp/boot.err.
boot() {
  bootmeter -m TANDEM-L2-INIT -t 300 -a 120 "$@" </dev/null > /tmp/boot.log 2>&1
  _rc=$?
  grep '^tandem: ' /tmp/boot.log > /tmp/boot.err
  [ $_rc = 0 ] || { echo "--- $1 failed ($_rc):" >&2; tail -n 20 /tmp/boot.log | sed 's/^/  | /' >&2; }
  grep '^BOOTMETER ' /tmp/boot.log | tail -n 1
}

# The number after TEXT in tandem's attach line (e.g. "attached in 812.3 ms").
after() { sed -n "s/.*$1 \\([0-9.]*\\).*/\\1/p" /tmp/boot.err | head -n 1; }

tandem_run() {  # MEMORY: sets t_probe t_attach t_dma
  _b=$(boot tandem $ARGS --memory "$1" --cmdline "$CMD" --vf "pf=$PF,index=0")
  t_probe=$(kv marker_ms $_b); t_rc=$(kv status $_b)
  t_attach=$(after "attached in"); t_dma=$(sed -n 's/.*ms (\([0-9.]*\) GiB\/s).*/\1/p' /tmp/boot.err | head -n 1)
}

qemu_run() {  # sets q_probe q_rc
  echo vfio-pci > /sys/bus/pci/devices/$VF/driver_override
  echo "$VF" > /sys/bus/pci/drivers_probe
  _b=$(boot qemu-as-tandem $ARGS --memory 512M --cmdline "$CMD" --device "path=/sys/bus/pci/devices/$VF")
  q_probe=$(kv marker_ms $_b); q_rc=$(kv status $_b)
  echo "$VF" > /sys/bus/pci/devices/$VF/driver/unbind
  echo > /sys/bus/pci/devices/$VF/driver_override
}

kernel_run() {  # sets k_pin k_huge k_rc
  echo vfio-pci > /sys/bus/pci/devices/$VF/driver_override
  echo "$VF" > /sys/bus/pci/drivers_probe
  _a=$(dmapin "$VF" 512); k_rc=$?
  _b=$(dmapin "$VF" 512 huge); k_rc=$((k_rc + $?))
  k_pin=$(kv gib_s $_a); k_huge=$(kv gib_s $_b)
  echo "$VF" > /sys/bus/pci/devices/$VF/driver/unbind
  echo > /sys/bus/pci/devices/$VF/driver_override
}

tandem_run 512M; qemu_run   # warm-up, not counted
i=1
while [ "$i" -le "$runs" ]; do
  if [ $((i % 2)) = 1 ]; then tandem_run 512M; qemu_run; else qemu_run; tandem_run 512M; fi
  tp=$t_probe ta=$t_attach td=$t_dma trc=$t_rc
  tandem_run size=512M,hugepages=on
  echo "BENCH vmm=tandem run=$i probe_ms=${tp:-0} attach_ms=${ta:-0} dma_gib_s=${td:-0} dma_huge_gib_s=${t_dma:-0} huge_probe_ms=${t_probe:-0} rc=$((trc + t_rc))"
  echo "BENCH vmm=qemu run=$i probe_ms=${q_probe:-0} rc=${q_rc:-1}"
  kernel_run
  echo "BENCH vmm=kernel run=$i pin_gib_s=${k_pin:-0} pin_huge_gib_s=${k_huge:-0} rc=$k_rc"
  i=$((i + 1))
done
echo 0 > /proc/sys/vm/nr_hugepages
echo 0 > $PFD/sriov_numvfs
