# L1 scenario for tests/bed_failover.rs (run-l1.sh --iommu --igb): a VF paired with a
# virtio-net standby (--net ...,standby=on + --vf ...,failover=<id>): the guest's
# net_failover joins them under one master, and traffic goes over the VF.
. /lib/bed.sh
PF=$(igb_pf_up 10.98.0.2/24) || exit 1
tap_up tfo 10.81.0.1/24     # the standby's backend (a bridge to the PF's network in production)

cat > /tmp/l2.sh <<'L2'
ip link set lo up
# No IPv6 chatter of its own on the standby: its counters then show only what the master sends.
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6
echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6
for n in /sys/class/net/*; do
  i=${n##*/}; [ "$i" = lo ] && continue
  d=-; [ -e "$n/device/driver" ] && d=$(basename "$(readlink "$n/device/driver")")
  m=-; [ -e "$n/master" ] && m=$(basename "$(readlink "$n/master")")
  echo "L2-FO-IF if=$i driver=$d master=$m mac=$(cat "$n/address")"
done
VF=$(l2_if_by_driver igbvf) || { echo "L2-FO-NO-VF"; exit 1; }
MASTER=$(basename "$(readlink /sys/class/net/$VF/master)")
SB=-
for n in /sys/class/net/*; do
  [ "${n##*/}" != "$VF" ] && [ -e "$n/master" ] && [ "$(basename "$(readlink "$n/master")")" = "$MASTER" ] && SB=${n##*/}
done
echo "L2-FO-MASTER if=$MASTER primary=$VF standby=$SB"
ip addr add 10.98.0.3/24 dev "$MASTER"
for i in "$MASTER" "$VF" "$SB"; do ip link set "$i" up; done
i=0; until grep -q 1 "/sys/class/net/$VF/carrier" 2>/dev/null || [ $i -ge 100 ]; do sleep 0.2; i=$((i + 1)); done
st() { cat "/sys/class/net/$1/statistics/$2"; }
v0=$(st "$VF" tx_packets) s0=$(st "$SB" tx_packets)
ping -c 20 -i 0.2 -W 3 10.98.0.2 > /tmp/ping.out 2>&1
echo "L2-FO-PING received=$(sed -n 's/.* \([0-9]*\) packets received.*/\1/p' /tmp/ping.out)"
echo "L2-FO-STATS vf_tx=$(( $(st "$VF" tx_packets) - v0 )) standby_tx=$(( $(st "$SB" tx_packets) - s0 ))"
L2
mkscript_disk /tmp/script.img /tmp/l2.sh
run_tandem failover --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 512M \
  --net tap=tfo,id=sb0,standby=on --vf "pf=$PF,index=0,create=on,failover=sb0,id=vf0" \
  --disk path=/tmp/script.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE"
echo "L1-AFTER-FAILOVER $(vf_state "$PF" 0)"
tap_down tfo

# Hot-unplug through the control socket: the guest gives the VF back (ACPI eject), Tandem
# releases it to the host at once (the VFs it made are gone) and the guest runs on.
tap_up tfo 10.81.0.1/24
SOCK=/tmp/fo.sock
cat > /tmp/unplug.sh <<'L2'
i=0; until l2_if_by_driver igbvf > /dev/null || [ $i -ge 100 ]; do sleep 0.2; i=$((i + 1)); done
echo "L2-UNPLUG-VF-UP if=$(l2_if_by_driver igbvf)"
i=0
while grep -qx 0x10ca /sys/bus/pci/devices/*/device 2>/dev/null && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done
echo "L2-UNPLUG-GONE vf_devices=$(grep -lx 0x10ca /sys/bus/pci/devices/*/device 2>/dev/null | wc -l) standby=$(ls /sys/class/net | tr '\n' ' ')"
sleep 600
L2
mkscript_disk /tmp/unplug.img /tmp/unplug.sh
run_bg unplug $TANDEM --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 512M --api-socket $SOCK \
  --net tap=tfo,id=sb0,standby=on --vf "pf=$PF,index=0,create=on,failover=sb0,id=vf0" \
  --disk path=/tmp/unplug.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE"
if run_wait_for unplug "L2-UNPLUG-VF-UP" 300; then
  now_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }
  t0=$(now_ms)
  $TANDEM ctl --api-socket $SOCK device-remove vf0 2>&1 | sed 's/^/L1-UNPLUG-CTL /'
  echo "L1-UNPLUG-TOOK ms=$(( $(now_ms) - t0 ))"
  echo "L1-UNPLUG-HOST $(vf_state "$PF" 0)"
  run_wait_for unplug "L2-UNPLUG-GONE" 60
  $TANDEM ctl --api-socket $SOCK device-remove vf0 2>&1 | sed 's/^/L1-UNPLUG-AGAIN /'
  $TANDEM ctl --api-socket $SOCK info | tr -d '\n ' | sed 's/^/L1-UNPLUG-INFO /'; echo
  $TANDEM ctl --api-socket $SOCK shutdown > /dev/null
fi
run_end unplug
tap_down tfo
