# L1 scenario for tests/bed_hotplug.rs (run-l1.sh --iommu --igb): a plain VFIO device
# (QEMU's edu, no failover) hot-plugged into a running guest and hot-unplugged again,
# CYCLES times. Each cycle the guest sees the device arrive (acpiphp), reads its BAR, and
# lets it go; L1 records Tandem's resource counters and open fds after every unplug, so a
# leak of GSIs, memory slots, DMA mappings or fds shows as a count that grows.
# A guest that stops is asked where it is (vm_bed_fault); when that shows the bed's own
# fault (an interrupt taken with interrupts disabled), or the guest died (tandem ended the
# run: a triple fault, a guest panic), the cycle is retried in a fresh VM, at most
# MAX_FAULTS times in all, and counts start again for that VM. A guest stuck without the
# bed's signature ends the scenario.
. /lib/bed.sh
CYCLES=${CYCLES:-20}
MAX_FAULTS=${MAX_FAULTS:-3}
EDU=-
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor"):$(cat "$d/device")" = 0x1234:0x11e8 ] && EDU=${d##*/}
done
echo "L1-EDU bdf=$EDU driver=$(basename "$(readlink /sys/bus/pci/devices/$EDU/driver 2>/dev/null)" 2>/dev/null)"

cat > /tmp/l2.sh <<'L2'
edu() {
  for d in /sys/bus/pci/devices/*; do
    [ "$(cat "$d/vendor" 2>/dev/null):$(cat "$d/device" 2>/dev/null)" = 0x1234:0x11e8 ] && { echo "$d"; return 0; }
  done
  return 1
}
echo "L2-HOTPLUG-READY"
k=0
while :; do
  i=0; until E=$(edu) || [ $i -ge 600 ]; do sleep 0.1; i=$((i + 1)); done
  [ -n "$E" ] || { echo "L2-EDU-NEVER-CAME n=$((k + 1))"; break; }
  k=$((k + 1))
  # The BAR is assigned once the device is enabled; wait for its resource line.
  i=0; B=0
  until [ "$B" -ne 0 ] || [ $i -ge 50 ]; do B=$(( $(awk 'NR == 1 { print $1 }' "$E/resource" 2>/dev/null || echo 0) )); i=$((i + 1)); sleep 0.1; done
  echo 1 > "$E/enable" 2>/dev/null
  devmem $((B + 4)) 32 $((0x1000 + k))
  echo "L2-EDU-UP n=$k slot=${E##*/} ident=$(devmem $B 32) liveness=$(devmem $((B + 4)) 32)"
  i=0; while [ -e "$E" ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
  [ -e "$E" ] && { echo "L2-EDU-STUCK n=$k"; break; }
  echo "L2-EDU-GONE n=$k"
done
sleep 600
L2
mkscript_disk /tmp/script.img /tmp/l2.sh
SOCK=/tmp/hp.sock
ctl() { $TANDEM ctl --api-socket $SOCK "$@"; }
resources() { ctl counters | tr -d '\n ' | sed -n 's/.*"resources":{\([^}]*\)}.*/\1/p' | tr -d '"' | tr ',:' ' ='; }
fds() { ls /proc/$PID/fd | wc -l; }
driver() { basename "$(readlink /sys/bus/pci/devices/$EDU/driver 2>/dev/null)" 2>/dev/null; }
ended() { run_ended $R; }
vm=0
vm_start() {
  vm=$((vm + 1)); R=hp$vm; j=0
  run_bg $R $TANDEM --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 256M --api-socket $SOCK \
    --disk path=/tmp/script.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE $L2_NMI_DUMP"
  PID=$(cat /tmp/run-$R.pid)
  run_wait_for $R "L2-HOTPLUG-READY" 300 || { vm_stuck_report $R $SOCK; run_end $R; return 1; }
  echo "L1-HP-START vm=$vm $(resources) fds=$(fds)"
}
# stuck WHAT : the guest stopped; 0 when it was the bed's fault and a fresh VM is up.
stuck() {
  echo "L1-HP-$1 vm=$vm n=$k"
  if ended; then
    why=$(run_console $R | grep "^tandem: " | tail -n 1)
    echo "L1-HP-GUEST-DIED vm=$vm rc=$(cat /tmp/run-$R.rc) driver=$(driver) said=$(echo "$why" | tr ' ' _)"
  else
    vm_stuck_report $R $SOCK
    vm_bed_fault $R $SOCK || return 1
  fi
  faults=$((faults + 1))
  run_end $R
  [ $faults -le "$MAX_FAULTS" ] || { echo "L1-HP-TOO-MANY-FAULTS faults=$faults"; return 1; }
  echo "L1-HP-RESTART vm=$((vm + 1)) after=$k faults=$faults"
  vm_start
}
k=0; faults=0
if vm_start; then
  while [ $k -lt "$CYCLES" ]; do
    n=$((k + 1))
    out=$(ctl device-add "device=path=/sys/bus/pci/devices/$EDU,id=edu" 2>&1) \
      || { ended && stuck ADD-ENDED && continue; echo "L1-HP-ADD-FAILED n=$n $(echo "$out" | tr -d '\n')"; break; }
    if ! run_wait_count $R "L2-EDU-UP" $((j + 1)) 60; then stuck NOT-SEEN && continue; break; fi
    echo "L1-HP-IN vm=$vm n=$n $(resources) fds=$(fds) driver=$(driver)"
    out=$(ctl device-remove edu 2>&1) || { ended && stuck REMOVE-ENDED && continue; echo "L1-HP-REMOVE-FAILED n=$n $(echo "$out" | tr -d '\n')"; break; }
    if ! run_wait_count $R "L2-EDU-GONE" $((j + 1)) 60; then stuck NOT-GONE && continue; break; fi
    j=$((j + 1)); k=$n
    echo "L1-HP-OUT vm=$vm n=$k $(resources) fds=$(fds) driver=$(driver) said=$(echo "$out" | tr -d '\n' | tr ' ' _)"
  done
  echo "L1-HP-END cycles=$k faults=$faults"
  ctl shutdown > /dev/null
  run_end $R
fi
echo "L1-AFTER-HP driver=$(driver)"
