# L1 scenario for tests/bed_hotplug.rs (run-l1.sh --iommu --igb): a plain VFIO device
# (QEMU's edu, no failover) hot-plugged into a running guest and hot-unplugged again,
# CYCLES times. Each cycle the guest sees the device arrive (acpiphp), reads its BAR, and
# lets it go; L1 records Tandem's resource counters and open fds after every unplug, so a
# leak of GSIs, memory slots, DMA mappings or fds shows as a count that grows.
. /lib/bed.sh
CYCLES=${CYCLES:-20}
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
run_bg hp $TANDEM --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 256M --api-socket $SOCK \
  --disk path=/tmp/script.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE"
PID=$(cat /tmp/run-hp.pid)
ctl() { $TANDEM ctl --api-socket $SOCK "$@"; }
wait_lines() {
  _i=0
  while [ "$(grep -c "$1" /tmp/run-hp.log)" -lt "$2" ] && [ $_i -lt $(($3 * 10)) ]; do sleep 0.1; _i=$((_i + 1)); done
  [ "$(grep -c "$1" /tmp/run-hp.log)" -ge "$2" ]
}
resources() { ctl counters | tr -d '\n ' | sed -n 's/.*"resources":{\([^}]*\)}.*/\1/p' | tr -d '"' | tr ',:' ' ='; }
fds() { ls /proc/$PID/fd | wc -l; }
if run_wait_for hp "L2-HOTPLUG-READY" 300; then
  echo "L1-HP-START $(resources) fds=$(fds)"
  k=0
  while [ $k -lt "$CYCLES" ]; do
    k=$((k + 1))
    out=$(ctl device-add "device=path=/sys/bus/pci/devices/$EDU,id=edu" 2>&1) \
      || { echo "L1-HP-ADD-FAILED n=$k $(echo "$out" | tr -d '\n')"; break; }
    wait_lines "L2-EDU-UP" $k 60 || { echo "L1-HP-NOT-SEEN n=$k"; vm_stuck_report hp $SOCK; break; }
    echo "L1-HP-IN n=$k $(resources) fds=$(fds) driver=$(basename "$(readlink /sys/bus/pci/devices/$EDU/driver)")"
    out=$(ctl device-remove edu 2>&1) || { echo "L1-HP-REMOVE-FAILED n=$k $(echo "$out" | tr -d '\n')"; break; }
    wait_lines "L2-EDU-GONE" $k 60 || { echo "L1-HP-NOT-GONE n=$k"; break; }
    echo "L1-HP-OUT n=$k $(resources) fds=$(fds) driver=$(basename "$(readlink /sys/bus/pci/devices/$EDU/driver 2>/dev/null)" 2>/dev/null) said=$(echo "$out" | tr -d '\n' | tr ' ' _)"
  done
  echo "L1-HP-END cycles=$k"
  ctl shutdown > /dev/null
else
  vm_stuck_report hp $SOCK
fi
run_end hp
echo "L1-AFTER-HP driver=$(basename "$(readlink /sys/bus/pci/devices/$EDU/driver 2>/dev/null)" 2>/dev/null)"
