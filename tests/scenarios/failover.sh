# L1 scenario for tests/bed_failover.rs (run-l1.sh --iommu --igb): a VF paired with a
# virtio-net standby (--net ...,standby=on + --vf ...,failover=<id>): the guest's
# net_failover joins them under one master, and traffic goes over the VF.
. /lib/bed.sh
PF=$(igb_pf_up 10.98.0.2/24) || exit 1
tap_up tfo 10.81.0.1/24     # the standby's backend (a bridge to the PF's network in production)

cat > /tmp/l2.sh <<'L2'
ip link set lo up
# The VF arrives by hot-plug once virtio_net has negotiated STANDBY: wait for it to be paired.
i=0; until { v=$(l2_if_by_driver igbvf) && [ -e "/sys/class/net/$v/master" ]; } || [ $i -ge 150 ]; do sleep 0.2; i=$((i + 1)); done
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
FO_SOCK=/tmp/failover.sock
run_bg failover $TANDEM --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 512M --api-socket $FO_SOCK \
  --net tap=tfo,id=sb0,standby=on --vf "pf=$PF,index=0,create=on,failover=sb0,id=vf0" \
  --disk path=/tmp/script.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE $L2_NMI_DUMP tandem.modules=igbvf"
# A guest that goes silent on its way (the bed's own fault strikes around a hot-plug) says
# where it is, and bed_failover.rs runs the bed again when that was the bed's fault.
if ! run_wait_for failover "L2-FO-STATS|TANDEM-L2-SCRIPT-EXIT" 120 && ! run_ended failover; then
  echo "L1-FO-GUEST-STOPPED"
  vm_stuck_report failover $FO_SOCK
  vm_bed_fault failover $FO_SOCK
  run_signal failover TERM
fi
run_end failover
echo "L1-AFTER-FAILOVER $(vf_state "$PF" 0)"
tap_down tfo

# Failover under traffic: L1's bridge br0 joins the PF and the standby's tap, as a host
# would; L1 pings the guest every 10 ms while the VF is removed (the standby carries the
# traffic) and added back (the VF carries it again).
PFADDR=10.98.0.2/24
$IPROUTE addr del $PFADDR dev "$PF"
$IPROUTE tuntap add dev tfo mode tap
$IPROUTE link add br0 type bridge && $IPROUTE link set br0 up
$IPROUTE link set "$PF" master br0 && $IPROUTE link set tfo master br0 && $IPROUTE link set tfo up
$IPROUTE addr add $PFADDR dev br0
SOCK=/tmp/fo.sock
cat > /tmp/switch.sh <<'L2'
ip link set lo up
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6
echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6
i=0; until { VF=$(l2_if_by_driver igbvf) && [ -e "/sys/class/net/$VF/master" ]; } || [ $i -ge 150 ]; do sleep 0.2; i=$((i + 1)); done
MASTER=$(basename "$(readlink /sys/class/net/$VF/master)")
SB=-
for n in /sys/class/net/*; do
  [ "${n##*/}" != "$VF" ] && [ -e "$n/master" ] && [ "$(basename "$(readlink "$n/master")")" = "$MASTER" ] && SB=${n##*/}
done
ip addr add 10.98.0.3/24 dev "$MASTER"
for i in "$MASTER" "$VF" "$SB"; do ip link set "$i" up; done
i=0; until grep -q 1 "/sys/class/net/$VF/carrier" 2>/dev/null || [ $i -ge 100 ]; do sleep 0.2; i=$((i + 1)); done
echo "L2-SW-READY master=$MASTER vf=$VF standby=$SB"
st() { cat "/sys/class/net/$1/statistics/$2" 2>/dev/null || echo -; }
# Each half second: which VF is there (after a re-plug its name may differ) and both paths' rx.
while :; do
  v=$(l2_if_by_driver igbvf) || v=-
  m=-; [ "$v" != - ] && [ -e "/sys/class/net/$v/master" ] && m=$(basename "$(readlink "/sys/class/net/$v/master")")
  c=-; [ "$v" != - ] && c=$(cat "/sys/class/net/$v/carrier" 2>/dev/null)
  echo "L2-SW vf=$v vf_master=$m vf_carrier=$c vf_rx=$(st "$v" rx_packets) vf_tx=$(st "$v" tx_packets) sb_rx=$(st "$SB" rx_packets) sb_tx=$(st "$SB" tx_packets) end"
  dmesg -c | grep -iE 'igbvf|failover|eth[0-9]' | sed 's/^/L2-KMSG /'
  sleep 0.5
done
L2
mkscript_disk /tmp/switch.img /tmp/switch.sh
run_bg switch $TANDEM --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 512M --api-socket $SOCK \
  --net tap=tfo,id=sb0,standby=on --vf "pf=$PF,index=0,create=on,failover=sb0,id=vf0" \
  --disk path=/tmp/switch.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE $L2_NMI_DUMP tandem.modules=igbvf"
ctl() { $TANDEM ctl --api-socket $SOCK "$@"; }
# ping_report MARKER LOG: busybox ping's answered seq numbers -> lost packets and the
# longest run of them (x 10 ms, the interval) from the first answer on, a silent end
# included (the first answers wait for L1's bridge and ARP, not for the failover).
ping_report() {
  awk -v m="$1" -F'seq=' 'BEGIN { prev = -1 }
    /bytes from/ { split($2, a, " "); s = a[1] + 0; if (n && s - prev - 1 > gap) gap = s - prev - 1; if (s > prev) prev = s; n++ }
    /packets transmitted/ { tx = $1 + 0 }
    END { if (tx - 1 - prev > gap) gap = tx - 1 - prev
      printf "%s sent=%d received=%d lost=%d longest_gap=%d outage_ms=%d\n", m, tx, n, tx - n, gap, gap * 10 }' "$2"
}
sb_rx() { ctl counters | tr -d '\n ' | sed -n 's/.*"sb0":{[^}]*"rx_packets":\([0-9]*\).*/\1/p'; }
# Both paths as Tandem counts them: the standby's rx and the VF's (its own registers).
paths() {
  _c=$(ctl counters | tr -d '\n ')
  _v() { echo "$_c" | sed -n "s/.*\"$1\":{[^}]*\"$2\":\([0-9]*\).*/\1/p"; }
  echo "sb0_rx=$(_v sb0 rx_packets) vf0_rx=$(_v vf0 rx_packets) vf0_rx_bytes=$(_v vf0 rx_bytes)"
}
# Only whole lines: the guest may be halfway through writing the last one.
last_sw() { run_console switch | grep "^L2-SW .* end" | tail -n 1; }
# 180 s: well inside the run's timeout (RUN_TIMEOUT, 300 s), so that a guest stuck on its
# way is asked where it is while its VMM still runs.
if run_wait_for switch "L2-SW-READY" 180; then
  # The guest prints an L2-SW line every half second: when they stop for 5 s, ask it where
  # it is (vm_bed_fault ends the run; bed_failover.rs runs the bed again on the bed's fault).
  ( prev=0 still=0
    while [ -e /proc/$(cat /tmp/run-switch.pid) ]; do
      sleep 1
      c=$(run_console switch | grep -c "^L2-SW ")
      if [ "$c" = "$prev" ]; then still=$((still + 1)); else still=0 prev=$c; fi
      [ $still -ge 5 ] || continue
      echo "L1-SW-GUEST-STOPPED lines=$c"
      touch /tmp/sw-stopped
      vm_stuck_report switch $SOCK
      vm_bed_fault switch $SOCK
      break
    done ) &
  WATCH=$!
  echo "L1-SW-INFO-START $(ctl info | tr -d '\n ')"
  ping -i 0.01 10.98.0.3 > /tmp/ping.log 2>&1 &
  PING=$!
  sleep 3
  echo "L1-SW-BEFORE sb0_rx=$(sb_rx) $(last_sw)"
  grep vfio /proc/interrupts | tr -s ' ' | sed 's/^/L1-SW-IRQ0 /'
  ctl device-remove vf0 2>&1 | sed 's/^/L1-SW-REMOVE /'
  echo "L1-SW-HOST-PARKED $(vf_state "$PF" 0)"
  ctl device-remove vf0 2>&1 | sed 's/^/L1-SW-REMOVE-AGAIN /'
  ctl device-add vf=pf=$PF,index=0,id=vf9 2>&1 | tr -d '\n' | sed 's/^/L1-SW-ADD-IN-USE /'; echo
  ctl device-add nosuch 2>&1 | tr -d '\n' | sed 's/^/L1-SW-ADD-UNKNOWN /'; echo
  sleep 4
  echo "L1-SW-DURING sb0_rx=$(sb_rx) $(last_sw) info=$(ctl info | tr -d '\n ')"
  ctl device-add vf0 2>&1 | tr -d '\n' | sed 's/^/L1-SW-ADD /'; echo
  ctl device-add vf0 2>&1 | tr -d '\n' | sed 's/^/L1-SW-ADD-AGAIN /'; echo
  sleep 6
  a=$(last_sw); pa=$(paths); sleep 2; b=$(last_sw); pb=$(paths)
  echo "L1-SW-AFTER-A $a"
  echo "L1-SW-AFTER-B $b sb0_rx=$(sb_rx)"
  echo "L1-SW-PATHS-A $pa"
  echo "L1-SW-PATHS-B $pb"
  $IPROUTE -s link show "$PF" | sed 's/^/L1-SW-PF /'
  dmesg | tail -n 20 | sed 's/^/L1-SW-KMSG /'
  grep vfio /proc/interrupts | tr -s ' ' | sed 's/^/L1-SW-IRQ /'
  kill -INT $PING; wait $PING
  ping_report L1-SW-PING /tmp/ping.log
  echo "L1-SW-HOST-BACK $(vf_state "$PF" 0)"

  # Automatic: the PF loses its link, Tandem unplugs the VF by itself (the standby carries
  # the traffic); the link comes back, and so does the VF.
  ping -i 0.01 10.98.0.3 > /tmp/ping2.log 2>&1 &
  PING=$!
  sleep 2
  echo "L1-AUTO-BEFORE sb0_rx=$(sb_rx) $(last_sw)"
  $IPROUTE link set "$PF" down
  run_wait_for switch "tandem: vf0: unplugged" 60 && echo "L1-AUTO-UNPLUGGED"
  sleep 3
  echo "L1-AUTO-DOWN sb0_rx=$(sb_rx) $(last_sw) info=$(ctl info | tr -d '\n ')"
  $IPROUTE link set "$PF" up
  run_wait_count switch "tandem: vf0: plugged into the guest" 3 60 && echo "L1-AUTO-REPLUGGED"
  sleep 6
  a=$(last_sw); sleep 2; b=$(last_sw)
  echo "L1-AUTO-UP-A $a"
  echo "L1-AUTO-UP-B $b info=$(ctl info | tr -d '\n ')"
  kill -INT $PING; wait $PING
  ping_report L1-AUTO-PING /tmp/ping2.log
  echo "L1-SW-COUNTERS $(ctl counters | tr -d '\n ')"

  # The host takes the VF away (its PF removes its VFs, which waits for whoever holds
  # one): Tandem is asked through VFIO's request interrupt, moves the traffic to the
  # standby and unplugs the VF, and the removal goes on.
  ping -i 0.01 10.98.0.3 > /tmp/ping3.log 2>&1 &
  PING=$!
  sleep 2
  echo "L1-GONE-BEFORE sb0_rx=$(sb_rx) $(last_sw)"
  ( timeout 60 sh -c "echo 0 > /sys/class/net/$PF/device/sriov_numvfs"; echo "L1-GONE-NUMVFS rc=$?" > /tmp/numvfs.out ) &
  NUMVFS=$!
  run_wait_for switch "unplugged and closed for the host" 60 && echo "L1-GONE-UNPLUGGED"
  wait $NUMVFS
  cat /tmp/numvfs.out
  sleep 3
  echo "L1-GONE-AFTER sb0_rx=$(sb_rx) $(last_sw) numvfs=$(cat /sys/class/net/$PF/device/sriov_numvfs) info=$(ctl info | tr -d '\n ')"
  kill -INT $PING; wait $PING
  ping_report L1-GONE-PING /tmp/ping3.log

  # The host makes its VFs again: the pair's VF comes back by itself (Tandem takes the new
  # VF as it did at the start) and the traffic returns to it.
  ping -i 0.01 10.98.0.3 > /tmp/ping4.log 2>&1 &
  PING=$!
  sleep 2
  echo "L1-RETURN-START sb0_rx=$(sb_rx) $(last_sw)"
  echo 1 > /sys/class/net/$PF/device/sriov_numvfs
  echo "L1-RETURN-NUMVFS $(vf_state "$PF" 0)"
  run_wait_count switch "tandem: vf0: plugged into the guest" 4 90 && echo "L1-RETURN-REPLUGGED"
  sleep 6
  a=$(last_sw); sleep 2; b=$(last_sw)
  echo "L1-RETURN-A $a"
  echo "L1-RETURN-B $b info=$(ctl info | tr -d '\n ') $(vf_state "$PF" 0)"
  kill -INT $PING; wait $PING
  ping_report L1-RETURN-PING /tmp/ping4.log
  # A watch that found the guest stopped finishes asking it where it is (its NMI ends the
  # run), so that the harness can tell the bed's fault; any other is stopped here.
  [ -e /tmp/sw-stopped ] || kill $WATCH 2> /dev/null
  wait $WATCH 2> /dev/null
  ctl shutdown > /dev/null
elif ! run_ended switch; then
  echo "L1-SW-GUEST-STOPPED before-ready"
  vm_stuck_report switch $SOCK
  vm_bed_fault switch $SOCK
  run_signal switch TERM
fi
run_end switch
# A guest kernel that died before the shutdown above (seen once: a triple fault during
# steady traffic, seconds after a re-plug): bed_failover.rs runs the bed again, presuming
# the bed's fault as bed_hotplug does for its guests that die, and prints each.
# (A panic is left out: the stuck-guest watch above makes one with its NMI.)
if run_console switch all | grep -qE "^tandem: vCPU [0-9]+ triple-faulted"; then
  echo "L1-SW-GUEST-DIED rc=$(cat /tmp/run-switch.rc) said=$(run_console switch | grep '^tandem: ' | tail -n 1 | tr ' ' _)"
fi
echo "L1-SW-AFTER-EXIT $(vf_state "$PF" 0)"
$IPROUTE link del br0
tap_down tfo
