# L1 scenario for tests/bed_faults.rs: tandem stopped by SIGINT, SIGTERM and SIGKILL, each
# mid-boot and mid-traffic, a guest that triple-faults or panics, disks that fill up or
# shrink under the guest, and a tap deleted under a running NIC. The taps of the signal runs are tandem's own (created by
# it, so they must go with it).
. /lib/bed.sh
SOCK=/tmp/faults.sock
tap_state() { $IPROUTE link show "$1" > /dev/null 2>&1 && echo left || echo gone; }

# 1. SIGINT, SIGTERM and SIGKILL while the guest kernel boots.
for sig in INT TERM KILL; do
  r=boot_$sig tap=tfb$sig
  run_bg $r $TANDEM --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 256M \
    --net tap=$tap,id=nic0 --cmdline "$L2_CMDLINE"
  sleep 1
  echo "L1-FAULT-$r-BEFORE tap=$(tap_state $tap) booted=$(run_console $r | grep -c TANDEM-L2-INIT)"
  run_signal $r $sig
  run_end $r
  echo "L1-FAULT-$r rc=$(cat /tmp/run-$r.rc) tap=$(tap_state $tap)"
done

# 2. SIGINT, SIGTERM and SIGKILL while the guest streams TCP to L1 over tandem's tap.
cat > /tmp/send.sh <<'L2'
l2_net_up 10.79.2.2/24
echo "L2-FAULT-SENDING"
tcp_send 10.79.2.1 5003 1 1000000000
echo "L2-FAULT-SEND-ENDED"
L2
mkscript_disk /tmp/send.img /tmp/send.sh
for sig in INT TERM KILL; do
  tap=tf$sig
  run_bg "$sig" $TANDEM --kernel $L2_KERNEL --initramfs $L2_INITRD_TOOLS --memory 256M \
    --net "tap=$tap,id=nic0" --disk path=/tmp/send.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE"
  i=0; until $IPROUTE link show "$tap" > /dev/null 2>&1 || [ $i -ge 300 ]; do sleep 0.1; i=$((i + 1)); done
  $IPROUTE addr add 10.79.2.1/24 dev "$tap" && $IPROUTE link set "$tap" up
  tcp_recv 5003 > /dev/null 2>&1 &
  sink=$!
  run_wait_for "$sig" "L2-FAULT-SENDING" 300
  sleep 2
  echo "L1-FAULT-$sig-TRAFFIC rx_bytes=$(cat /sys/class/net/$tap/statistics/rx_bytes 2>/dev/null || echo 0)"
  run_signal "$sig" "$sig"
  run_end "$sig"
  kill $sink 2>/dev/null; pkill -f "nc -l -p 5003" 2>/dev/null
  echo "L1-FAULT-$sig rc=$(cat /tmp/run-$sig.rc) tap=$(tap_state "$tap")"
done
$TANDEM cleanup > /tmp/cleanup.out 2>&1
echo "L1-FAULT-CLEANUP-RC rc=$?"
sed 's/^/L1-FAULT-CLEANUP /' /tmp/cleanup.out

# 3. A guest whose kernel reboots by triple fault (reboot=triple): tandem says so and fails.
printf 'echo "L2-FAULT-TRIPLE"\nreboot -f\nsleep 30\n' | mkscript_disk /tmp/triple.img -
run_tandem triple --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 256M \
  --disk path=/tmp/triple.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE reboot=triple"

# 3b. A guest kernel that panics (sysrq c, after /init loaded pvpanic): tandem says so and
#     fails, though with panic=-1 the guest then reboots.
run_tandem panic --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 256M --cmdline "$L2_CMDLINE tandem.action=panic"

# 4. Disks that fail under the guest: one whose image sits on a 4 MiB tmpfs (it fills up),
#    one whose image L1 truncates while the guest runs (it shrinks to nothing).
mkdir -p /tmp/small && mount -t tmpfs -o size=4m small /tmp/small
mkdisk /tmp/small/full.img 32M
mkdisk /tmp/shrink.img 16M 3
cat > /tmp/disks.sh <<'L2'
F=$(l2_disk_by_serial full); S=$(l2_disk_by_serial shrink)
dd if=/dev/zero of=/dev/$F bs=1M count=16 conv=fsync 2>/dev/null; echo "L2-FULL-DD rc=$?"
echo "L2-SHRINK-READY"
sleep 3
dd if=/dev/$S of=/dev/null bs=1M count=8 2>/dev/null; echo "L2-SHRINK-DD rc=$?"
echo "L2-DISK-ERRORS kmsg=$(dmesg | grep -c 'I/O error')"
echo "L2-FAULT-ALIVE"
sleep 5
L2
mkscript_disk /tmp/disks.img /tmp/disks.sh
run_bg disks $TANDEM --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 256M --api-socket $SOCK \
  --disk path=/tmp/small/full.img,id=full --disk path=/tmp/shrink.img,id=shrink \
  --disk path=/tmp/disks.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE"
run_wait_for disks "L2-SHRINK-READY" 300 && truncate -s 0 /tmp/shrink.img
run_wait_for disks "L2-FAULT-ALIVE" 120
$TANDEM ctl --api-socket $SOCK counters | tr -d '\n ' | sed 's/^/L1-FAULT-DISK-COUNTERS /'; echo
run_end disks
umount /tmp/small

# 5. The tap deleted under a running NIC whose guest keeps sending: the device loop must go
#    idle (its CPU time over 5 s, in clock ticks of 10 ms), the guest keep running.
tap_up tfgone 10.79.3.1/24
cat > /tmp/gone.sh <<'L2'
l2_net_up 10.79.3.2/24
ping -c 2 -W 3 10.79.3.1 > /dev/null && echo "L2-GONE-PING-OK"
echo "L2-GONE-READY"
ping -c 20 -W 1 10.79.3.1 > /dev/null; echo "L2-GONE-PING-AFTER rc=$?"
echo "L2-GONE-END"
L2
mkscript_disk /tmp/gone.img /tmp/gone.sh
run_bg gone $TANDEM --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 256M \
  --net tap=tfgone,id=nic0 --disk path=/tmp/gone.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE"
run_wait_for gone "L2-GONE-READY" 300
# The tap is tandem's (open) now: only rtnetlink can delete it, not TUNSETIFF.
$IPROUTE link delete tfgone
echo "L1-GONE-DELETED tap=$(tap_state tfgone)"
pid=$(cat /tmp/run-gone.pid)
loop_ticks() {
  for t in /proc/$pid/task/*; do
    [ "$(cat "$t/comm")" = devices ] && awk '{ print $14 + $15 }' "$t/stat"
  done
}
sleep 1
a=$(loop_ticks); sleep 5; b=$(loop_ticks)
echo "L1-GONE-LOOP-CPU ticks=$((b - a)) secs=5"
run_end gone
