# L1 scenario for tests/bed_vfio.rs (run-l1.sh --iommu --igb): an igb VF passed to L2 with
# --vf, its lifecycle on the host side, and the refusals.
. /lib/bed.sh
PF=$(igb_pf_up 10.98.0.2/24) || exit 1
echo "L1-PF if=$PF $(vf_state "$PF" 0)"

cat > /tmp/l2.sh <<'L2'
l2_pci_report
l2_net_report
IF=$(l2_if_by_driver igbvf) || { echo "L2-VF-NO-IGBVF"; exit 1; }
ip link set lo up
ip addr add 10.98.0.3/24 dev "$IF" && ip link set "$IF" up
i=0; until grep -q 1 "/sys/class/net/$IF/carrier" 2>/dev/null || [ $i -ge 100 ]; do sleep 0.2; i=$((i + 1)); done
before=$(l2_irq_count "$IF")
ping -c 3 -W 3 10.98.0.1 >/dev/null && echo "L2-VF-PING-WIRE-OK"
ping -c 3 -W 3 10.98.0.2 >/dev/null && echo "L2-VF-PING-PF-OK"
echo "L2-VF if=$IF mac=$(cat /sys/class/net/$IF/address) carrier=$(cat /sys/class/net/$IF/carrier) irqs_before=$before irqs_after=$(l2_irq_count "$IF")"
grep -E "$IF|igbvf" /proc/interrupts | tr -s ' ' | sed 's/^/L2-IRQ /'
L2
mkscript_disk /tmp/script.img /tmp/l2.sh

# 1. create=on: Tandem makes the VFs, sets the MAC, binds vfio-pci; all undone at exit.
run_vm create --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 512M \
  --vf "pf=$PF,index=0,mac=02:00:00:00:aa:01,create=on,id=vf0" \
  --disk path=/tmp/script.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE $L2_NMI_DUMP"
echo "L1-AFTER-CREATE $(vf_state "$PF" 0)"
ls /run/tandem/vf/ 2>/dev/null | sed 's/^/L1-JOURNAL-LEFT /'

# 2. VFs the host made (autoprobe on, VF 0 on igbvf): Tandem borrows VF 0 and gives it back
#    on igbvf with its original MAC, after a clean poweroff, and after SIGTERM, SIGINT and
#    SIGKILL + cleanup, each mid-boot and mid-traffic.
PFD=/sys/class/net/$PF/device
echo 0 > $PFD/sriov_drivers_autoprobe    # igbvf probing mid PF re-init never recovers
echo 2 > $PFD/sriov_numvfs
sleep 1
echo 1 > $PFD/sriov_drivers_autoprobe
for v in $PFD/virtfn*; do basename "$(readlink "$v")" > /sys/bus/pci/drivers_probe; done
i=0; until [ -e $PFD/virtfn0/driver ] || [ $i -ge 50 ]; do sleep 0.2; i=$((i + 1)); done
echo "L1-HOST-VF $(vf_state "$PF" 0)"
# This run's RAM is 2 MiB huge pages (pinned for DMA a huge page at a time).
echo 256 > /proc/sys/vm/nr_hugepages
echo "L1-HUGEPAGES free=$(cat /sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages)"
run_vm borrow --kernel $L2_KERNEL --initramfs $L2_INITRD --memory size=512M,hugepages=on \
  --vf "pf=$PF,index=0,mac=02:00:00:00:aa:02,id=vf0" \
  --disk path=/tmp/script.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE $L2_NMI_DUMP"
echo "L1-AFTER-BORROW $(vf_state "$PF" 0)"
echo 0 > /proc/sys/vm/nr_hugepages

# Mid-traffic: the guest pings the PF every 10 ms over the VF until the signal comes.
cat > /tmp/hold.sh <<'L2'
IF=$(l2_if_by_driver igbvf) || { echo "L2-VF-NO-IGBVF"; exit 1; }
ip addr add 10.98.0.3/24 dev "$IF" && ip link set "$IF" up
i=0; until grep -q 1 "/sys/class/net/$IF/carrier" 2>/dev/null || [ $i -ge 100 ]; do sleep 0.2; i=$((i + 1)); done
ping -i 0.01 10.98.0.2 > /dev/null 2>&1 &
echo "L2-VF-UP if=$IF mac=$(cat /sys/class/net/$IF/address)"
sleep 600
L2
mkscript_disk /tmp/hold.img /tmp/hold.sh
# pf_traffic NAME: the packets the PF took from the guest in one second, then the VF's state.
pf_traffic() {
  _a=$(cat /sys/class/net/$PF/statistics/rx_packets); sleep 1; _b=$(cat /sys/class/net/$PF/statistics/rx_packets)
  echo "L1-DURING-$1 pf_rx=$((_b - _a)) $(vf_state "$PF" 0)"
}
# Each signal at both moments, each run with its MAC (the VF's state during a run shows it):
#   boot_<sig>     while the guest kernel boots: the VF is leased and mapped, no driver has it
#   traffic_<sig>  while the guest pings over the VF
# after SIGKILL nothing of tandem runs: `tandem cleanup` gives the VF back.
n=5
for phase in boot traffic; do
  for sig in TERM INT KILL; do
    r=${phase}_$sig
    try=1
    # A guest the bed's fault stopped before its traffic began is made again (see run_vm).
    while :; do
      rm -f /tmp/$r.sock
      run_bg $r $TANDEM --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 512M \
        --vf "pf=$PF,index=0,mac=02:00:00:00:aa:$(printf %02x $n),id=vf0" --api-socket /tmp/$r.sock \
        --disk path=/tmp/hold.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE $L2_NMI_DUMP"
      if [ $phase = boot ]; then
        run_wait_for $r "mapped for DMA" 60 && sleep 0.5 && echo "L1-DURING-$r $(vf_state "$PF" 0)"
        break
      fi
      run_wait_for $r "L2-VF-UP" 240 && { pf_traffic $r; break; }
      [ $try = 1 ] && ! run_ended $r || break
      echo "L1-RUN-STUCK $r attempt=$try"
      vm_stuck_report $r /tmp/$r.sock
      vm_bed_fault $r /tmp/$r.sock || break
      run_ended $r || { sleep 5; run_ended $r || run_signal $r TERM; }
      run_end $r "$r~fault"
      try=2
    done
    n=$((n + 1))
    run_signal $r $sig
    run_end $r
    echo "L1-AFTER-$r $(vf_state "$PF" 0)"
    if [ $sig = KILL ]; then
      $TANDEM cleanup 2>&1 | sed "s/^/L1-CLEANUP-$r /"
      echo "L1-AFTER-CLEANUP-$r $(vf_state "$PF" 0)"
    fi
  done
done

# 3. --device on one of the two e1000e functions that share an IOMMU group (run-l1.sh):
#    refused, naming the other one and its driver; nothing on the host changes.
SIB=-
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor"):$(cat "$d/device")" = 0x8086:0x10d3 ] && SIB=${d##*/}
done
echo "L1-GROUP dev=$SIB members=$(ls /sys/bus/pci/devices/$SIB/iommu_group/devices | tr '\n' ' ')"
run_tandem shared --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 256M --serial off \
  --device path=/sys/bus/pci/devices/$SIB
echo "L1-AFTER-SHARED driver=$(basename "$(readlink /sys/bus/pci/devices/$SIB/driver)") override=$(cat /sys/bus/pci/devices/$SIB/driver_override)"

# 4. INTx, which VFs lack: QEMU's edu device (pin A, MSI but no MSI-X) passed with --device.
#    The guest binds uio_pci_generic (INTx only), checks a register round trip through the
#    BAR, raises the device's interrupt with a register write and counts it.
EDU=-
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor"):$(cat "$d/device")" = 0x1234:0x11e8 ] && EDU=${d##*/}
done
cat > /tmp/edu.sh <<'L2'
E=-
for d in /sys/bus/pci/devices/*; do
  [ "$(cat "$d/vendor"):$(cat "$d/device")" = 0x1234:0x11e8 ] && E=$d
done
echo "1234 11e8" > /sys/bus/pci/drivers/uio_pci_generic/new_id
B=$(( $(awk 'NR == 1 { print $1 }' "$E/resource") ))
devmem $((B + 4)) 32 0x12345678
echo "L2-EDU ident=$(devmem $B 32) liveness=$(devmem $((B + 4)) 32) driver=$(basename "$(readlink "$E/driver")") pin=$(od -An -tu1 -j 61 -N 1 "$E/config" | tr -d ' ')"
before=$(l2_irq_count uio_pci_generic)
devmem $((B + 0x60)) 32 1
sleep 1
after=$(l2_irq_count uio_pci_generic)
devmem $((B + 0x64)) 32 1
echo "L2-INTX before=$before after=$after"
grep uio_pci_generic /proc/interrupts | tr -s ' ' | sed 's/^/L2-IRQ /'
L2
mkscript_disk /tmp/edu.img /tmp/edu.sh
run_vm intx --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 256M \
  --device "path=/sys/bus/pci/devices/$EDU,id=edu" \
  --disk path=/tmp/edu.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE $L2_NMI_DUMP"
echo "L1-AFTER-INTX driver=$(basename "$(readlink /sys/bus/pci/devices/$EDU/driver 2>/dev/null)" 2>/dev/null)"
