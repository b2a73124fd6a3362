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
# The hot path: the same VF plugged into a running, idle guest (its script sleeps) through
# each VMM's control socket — `tandem ctl device-add device=path=...` against QMP
# `device_add vfio-pci` on a pcie-root-port — timed as the client's wall time from its
# start to its exit (bootmeter's exit_ms). L1 binds the VF to vfio-pci for both. For both
# VMMs it is the guest's first VFIO device, so the time includes mapping guest RAM for DMA.
# RUNS rounds (tandem.bench_runs), in each: tandem, qemu, tandem with hugepages=on, the order
# of the first two alternating, then the hot plug into each (alternating too). Output, one
# line per round and VMM (rc: the runs' statuses, 0 when all went well):
#   BENCH vmm=tandem run=<i> probe_ms=<ms> attach_ms=<ms> dma_gib_s=<x> dma_huge_gib_s=<x> huge_probe_ms=<ms> hot_attach_ms=<ms> rc=<n>
#   BENCH vmm=qemu run=<i> probe_ms=<ms> hot_attach_ms=<ms> rc=<n>
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

# L1's free memory compacted before each VMM starts: pinning 512 MiB of THP-backed RAM
# costs 1.6 s or 4.6 s depending on what ran before (measured: the first hot plug of
# each round was the slow one, whichever VMM it was), and neither VMM should inherit
# the other's fragmentation.
compact() { echo 1 > /proc/sys/vm/compact_memory; }

# boot VMM ARGS... : bootmeter's line, with the VMM's stderr in /tmp/boot.err.
boot() {
  compact
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
  compact; _a=$(dmapin "$VF" 512); k_rc=$?
  compact; _b=$(dmapin "$VF" 512 huge); k_rc=$((k_rc + $?))
  k_pin=$(kv gib_s $_a); k_huge=$(kv gib_s $_b)
  echo "$VF" > /sys/bus/pci/devices/$VF/driver/unbind
  echo > /sys/bus/pci/devices/$VF/driver_override
}

printf 'echo L2-HOLD\nsleep 600\n' | mkscript_disk /tmp/hold.img -
HOLD="--memory 512M --disk path=/tmp/hold.img,readonly=on,id=script"
HCMD="console=ttyS0 panic=-1 quiet tandem.action=script"

# hot VMM NAME PLUG... : boots VMM's guest (VMM takes Tandem's arguments) with its control
# socket at /tmp/hot.sock, waits for the guest's script, times PLUG (a client command
# line) and ends the VM with $hot_end (a client command line); sets h_ms h_rc.
hot() {
  _vmm=$1 _n=$2; shift 2
  echo vfio-pci > /sys/bus/pci/devices/$VF/driver_override
  echo "$VF" > /sys/bus/pci/drivers_probe
  rm -f /tmp/hot.sock
  compact
  run_bg "$_n" "$_vmm" $ARGS $HOLD --api-socket /tmp/hot.sock --cmdline "$HCMD"
  h_ms=0 h_rc=1
  if run_wait_for "$_n" L2-HOLD 300; then
    # A marker the client never prints: bootmeter only times it (and stops nothing).
    _b=$(bootmeter -q -m NO-MARKER -t 120 "$@" | tail -n 1)
    h_ms=$(kv exit_ms $_b); h_rc=$(kv status $_b)
  fi
  $hot_end > /dev/null 2>&1
  _i=0; until run_ended "$_n" || [ $_i -ge 100 ]; do sleep 0.1; _i=$((_i + 1)); done
  run_ended "$_n" || run_signal "$_n" TERM
  run_end "$_n" > /tmp/hot.log 2>&1 || h_rc=$((h_rc + 1))
  [ "$h_rc" = 0 ] || { echo "--- hot plug into $_vmm failed ($h_rc):" >&2; tail -n 20 /tmp/hot.log | sed 's/^/  | /' >&2; }
  echo "$VF" > /sys/bus/pci/devices/$VF/driver/unbind 2>/dev/null
  echo > /sys/bus/pci/devices/$VF/driver_override
}
hot_tandem() {  # sets th_ms th_rc
  hot_end="tandem ctl --api-socket /tmp/hot.sock shutdown"
  hot tandem hot-tandem tandem ctl --api-socket /tmp/hot.sock device-add "device=path=/sys/bus/pci/devices/$VF,id=hot"
  th_ms=$h_ms th_rc=$h_rc
}
hot_qemu() {  # sets qh_ms qh_rc
  hot_end="qmpc /tmp/hot.sock {\"execute\":\"quit\"}"
  export QEMU_AS_TANDEM_ARGS="-device pcie-root-port,id=rp1,chassis=1"
  hot qemu-as-tandem hot-qemu qmpc -t 60 /tmp/hot.sock \
    "{\"execute\":\"device_add\",\"arguments\":{\"driver\":\"vfio-pci\",\"host\":\"$VF\",\"bus\":\"rp1\",\"id\":\"hot\"}}"
  unset QEMU_AS_TANDEM_ARGS
  qh_ms=$h_ms qh_rc=$h_rc
}

tandem_run 512M; qemu_run   # warm-up, not counted
i=1
while [ "$i" -le "$runs" ]; do
  if [ $((i % 2)) = 1 ]; then tandem_run 512M; qemu_run; else qemu_run; tandem_run 512M; fi
  tp=$t_probe ta=$t_attach td=$t_dma trc=$t_rc
  tandem_run size=512M,hugepages=on
  if [ $((i % 2)) = 1 ]; then hot_tandem; hot_qemu; else hot_qemu; hot_tandem; fi
  echo "BENCH vmm=tandem run=$i probe_ms=${tp:-0} attach_ms=${ta:-0} dma_gib_s=${td:-0} dma_huge_gib_s=${t_dma:-0} huge_probe_ms=${t_probe:-0} hot_attach_ms=${th_ms:-0} rc=$((trc + t_rc + th_rc))"
  echo "BENCH vmm=qemu run=$i probe_ms=${q_probe:-0} hot_attach_ms=${qh_ms:-0} rc=$((${q_rc:-1} + qh_rc))"
  kernel_run
  echo "BENCH vmm=kernel run=$i pin_gib_s=${k_pin:-0} pin_huge_gib_s=${k_huge:-0} rc=$k_rc"
  i=$((i + 1))
done
echo 0 > /proc/sys/vm/nr_hugepages
echo 0 > $PFD/sriov_numvfs
