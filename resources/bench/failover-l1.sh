# shellcheck shell=dash
# L1 scenario of resources/bench/failover.sh (run-l1.sh --iommu --igb, with L0's pinger on
# tap0 in the bed's network namespace): the failover of a VF paired with a virtio-net
# standby, Tandem against QEMU 7.2, one guest at a time, RUNS rounds, the VMM going first
# alternating from round to round.
#
# Network: L1's bridge br0 joins the igb PF and the persistent tap fotap, the standby's
# backend (L1 has no address on it: the traffic is L0 <-> L2 only). The guest's MAC is
# $MAC for both VMMs, and the VF's MAC (set on the PF) is the same: while the VF has it the
# igb hands L0's frames for the guest to the VF; with the VF's MAC cleared they reach the PF,
# then br0, then the tap. The guest (the lean L2 initramfs, 1 vCPU, 512 MiB, `quiet`, a
# script on a virtio disk) puts 10.98.0.3/24 on its net_failover master; L0 (10.98.0.1)
# pings it every 10 ms while L1 says "PINGMON on".
#
#   Tandem: --net tap=fotap,id=sb0,standby=on,mac=$MAC --vf pf=PF,index=0,create=on,
#           failover=sb0,id=vf0 --api-socket S; unplug `tandem ctl device-remove vf0`,
#           re-plug `tandem ctl device-add vf0` (Tandem moves the MAC and the bridge's FDB
#           entry itself).
#   QEMU:   -M q35 -accel kvm -cpu host, virtio-net-pci,failover=on,mac=$MAC on a tap with
#           vhost=off, vfio-pci,failover_pair_id=net0 on a pcie-root-port, QMP on a socket
#           (/bin/qmpc); the VF made, its MAC set and bound to vfio-pci by L1 beforehand, and
#           given by QMP device_add while QEMU is still paused (-S; a -device one could not be
#           added back: "Duplicate ID"). Unplug = QMP device_del, wait for DEVICE_DELETED,
#           clear the VF's MAC on the PF, then make br0 forget what it learnt on the PF
#           (tandem.fo_qemu_fdb=flush, the default: without it br0 keeps the guest's MAC on the
#           PF, learnt from the VF's looped-back broadcasts, and drops L0's frames until the
#           guest next sends over the standby, an ARP probe seconds later; =keep measures that);
#           re-plug = restore the MAC, QMP device_add.
#
# A scenario: boot; the guest prints "FOG ready"; "PINGMON on"; 5 s; unplug; $secs + 1 s on the
# standby; re-plug; wait for the guest's "FOG vf-rx"; 5 s; "PINGMON off"; the guest's "FOG tcp";
# shut the VM down.
# Lines on L1's console, time-stamped by L0's pinger as it reads them (the one clock of the
# analysis, done on L0 by failover.sh):
#   FOEV vmm=<v> run=<i> ev=<boot|ready|unplug|unplugged|replug|replugged|end|exit> [rc=<n>]
#   FOG vmm=<v> run=<i> <guest line>     the guest's own events, relayed as soon as L1 reads
#                                        them from the VMM's output:
#     FOG ready if=<master> primary=<vf> standby=<virtio> ping=<ok|fail>
#     FOG vf-gone                        the VF's netdev went away (the guest ejected it)
#     FOG vf-back if=<vf>                a VF netdev is there again (igbvf probed it)
#     FOG vf-rx if=<vf> rx=<n> tx=<n>    its rx_packets and tx_packets have both risen by 2
#                                        since: L0's requests and the guest's replies travel
#                                        over the VF again (the guest polls every ~20 ms)
#     FOG tcp bytes=<n>                  L0's TCP stream (pingmon -p 5003) ended: n bytes came
#   PINGMON on|off                       L0's pinger starts / stops
#   FOINFO ...                           context (VF state on the PF, where br0 puts the
#                                        guest's MAC, QMP/ctl transcripts), not analysed
#   --- <vmm> run <i> failed (...) / "  | " lines   the VMM's output when something failed
# Settings from L1's command line: tandem.bench_runs=<n> (3), tandem.bench_secs=<s> (5: time
# on the standby), tandem.fo_vmms=<tandem,qemu> (which VMMs to run), tandem.fo_qemu_fdb=
# <flush|keep> (above).
. /lib/bed.sh
runs=3 secs=5 vmms="tandem qemu" qemu_fdb=flush
for _a in $(cat /proc/cmdline); do
  case $_a in
    tandem.bench_runs=*) runs=${_a#*=} ;;
    tandem.bench_secs=*) secs=${_a#*=} ;;
    tandem.fo_vmms=*) vmms=$(echo "${_a#*=}" | tr , ' ') ;;
    tandem.fo_qemu_fdb=*) qemu_fdb=${_a#*=} ;;
  esac
done
MAC=02:98:00:00:00:03   # not QEMU's default 52:54:00:12:34:56, nor the L1 igb's
TAP=fotap
IMG=/tmp/fo-l2.img
CMD="$L2_SCRIPT_CMDLINE quiet"
CR=$(printf '\r')
QS=/tmp/fo-qmp.sock
TS=/tmp/fo-api.sock

PF=$(igb_pf_up 10.98.0.2/24) || exit 1
$IPROUTE addr flush dev "$PF"
PFD=/sys/class/net/$PF/device
echo 0 > "$PFD/sriov_drivers_autoprobe"
echo 0 > "$PFD/sriov_numvfs"
[ -e /proc/sys/net/ipv6/conf/all/disable_ipv6 ] && echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6
$IPROUTE link add br0 type bridge || exit 1
$IPROUTE link set "$PF" master br0 || exit 1
$IPROUTE tuntap add dev "$TAP" mode tap || exit 1
$IPROUTE link set "$TAP" master br0 && $IPROUTE link set "$TAP" up && $IPROUTE link set br0 up || exit 1
echo "FOINFO bridge br0: $PF $TAP mac=$MAC runs=$runs secs=$secs vmms=$vmms qemu_fdb=$qemu_fdb"

# ---- the guest's script ----
cat > /tmp/fo-l2.sh <<'L2'
echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6
echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6
ip link set lo up
# The VF is hot-plugged once virtio_net negotiated STANDBY, after /init chose its modules.
[ -d /sys/module/igbvf ] || insmod /modules/igbvf.ko || echo "FOG error insmod-igbvf"
vf_now() {  # VF = the igbvf netdev, if any (globs only: no fork in the polling loop)
  VF=
  for _n in /sys/bus/pci/drivers/igbvf/*/net/*; do [ -e "$_n" ] && VF=${_n##*/}; done
  [ -n "$VF" ]
}
i=0
until vf_now && [ -e "/sys/class/net/$VF/master" ]; do
  [ $i -ge 600 ] && { echo "FOG error no-paired-vf $(ls /sys/class/net | tr '\n' ' ')"; exit 1; }
  sleep 0.2; i=$((i + 1))
done
M=$(basename "$(readlink "/sys/class/net/$VF/master")")
SB=
for _l in /sys/class/net/"$M"/lower_*; do
  _n=${_l##*/lower_}; [ "$_n" != "$VF" ] && [ -e "$_l" ] && SB=$_n
done
ip addr add 10.98.0.3/24 dev "$M"
for _i in "$M" "$SB" "$VF"; do [ -n "$_i" ] && ip link set "$_i" up; done
i=0; until grep -q 1 "/sys/class/net/$VF/carrier" 2>/dev/null || [ $i -ge 100 ]; do sleep 0.2; i=$((i + 1)); done
# The TCP stream L0's pinger sends along with its pings (pingmon -p 5003): its bytes are
# counted and reported once L0 closes it. nc's stdin: a FIFO opened O_RDWR never ends.
mkfifo /tmp/tcp-hold
( n=$(nc -l -p 5003 0<> /tmp/tcp-hold | wc -c); echo "FOG tcp bytes=$n" ) &
p=fail; ping -c 2 -W 2 10.98.0.1 > /dev/null 2>&1 && p=ok
echo "FOG ready if=$M primary=$VF standby=${SB:--} ping=$p"
state=up
while :; do
  case $state in
    up) [ -e "/sys/class/net/$VF" ] || { echo "FOG vf-gone"; state=gone; } ;;
    gone)
      if vf_now; then
        read -r r0 < "/sys/class/net/$VF/statistics/rx_packets" || r0=0
        read -r t0 < "/sys/class/net/$VF/statistics/tx_packets" || t0=0
        echo "FOG vf-back if=$VF"; state=back
      fi ;;
    back)
      if read -r r < "/sys/class/net/$VF/statistics/rx_packets" && read -r t < "/sys/class/net/$VF/statistics/tx_packets"; then
        [ $((r - r0)) -ge 2 ] && [ $((t - t0)) -ge 2 ] && { echo "FOG vf-rx if=$VF rx=$r tx=$t"; state=up; }
      else
        state=gone
      fi ;;
  esac
  read -r up _ < /proc/uptime
  [ "${up%.*}" -ge 1500 ] && break
  sleep 0.02
done
L2
mkscript_disk "$IMG" /tmp/fo-l2.sh

# ---- running a VMM ----
# vmm_start VMM CMD... : CMD in the background (stdin /dev/null, 900 s at most); its output
# (the guest's console and the VMM's messages) goes to /tmp/fo-VMM.log through a relay that
# copies the guest's "FOG ..." lines to L1's console at once, as "FOG vmm=VMM run=$r ...".
vmm_start() {
  _v=$1; shift
  rm -f /tmp/fo-$_v.log /tmp/fo-$_v.rc /tmp/fo-$_v.pid /tmp/fo-$_v.fifo
  : > /tmp/fo-$_v.log
  mkfifo /tmp/fo-$_v.fifo
  ( while IFS= read -r _l; do
      _l=${_l%"$CR"}
      printf '%s\n' "$_l" >> /tmp/fo-$_v.log
      case $_l in *"FOG "*) echo "FOG vmm=$_v run=$r ${_l#*FOG }" ;; esac
    done < /tmp/fo-$_v.fifo ) &
  # busybox timeout execs CMD: the background job's pid is CMD's.
  ( timeout -k 10 900 "$@" < /dev/null > /tmp/fo-$_v.fifo 2>&1 &
    echo $! > /tmp/fo-$_v.pid
    wait $!
    echo $? > /tmp/fo-$_v.rc ) &
  while [ ! -s /tmp/fo-$_v.pid ]; do sleep 0.05; done
}

# vmm_wait_log VMM REGEX SECS : until the VMM's output has a line matching REGEX (rc 0), it
# ended (rc 1) or SECS passed (rc 1).
vmm_wait_log() {
  _end=$(( $(date +%s) + $3 ))
  until grep -qE "$2" /tmp/fo-$1.log; do
    [ -s /tmp/fo-$1.rc ] || [ "$(date +%s)" -ge $_end ] && { grep -qE "$2" /tmp/fo-$1.log; return; }
    sleep 0.1
  done
}

# vmm_end VMM SECS : waits SECS at most for the VMM to exit, then kills it (by its pid);
# prints its exit status.
vmm_end() {
  _end=$(( $(date +%s) + $2 ))
  while [ ! -s /tmp/fo-$1.rc ] && [ "$(date +%s)" -lt $_end ]; do sleep 0.2; done
  if [ ! -s /tmp/fo-$1.rc ]; then
    kill -TERM "$(cat /tmp/fo-$1.pid)" 2>/dev/null
    sleep 5
    kill -KILL "$(cat /tmp/fo-$1.pid)" 2>/dev/null
    while [ ! -s /tmp/fo-$1.rc ]; do sleep 0.2; done
  fi
  cat /tmp/fo-$1.rc
}

ev() { echo "FOEV vmm=$v run=$r ev=$*"; }
# step ACTION DONE : event ACTION, ${v}_ACTION, event "DONE rc=<its status>"; a failure
# fails the scenario (ok=0).
step() {
  ev "$1"
  "${v}_$1"; _rc=$?
  ev "$2 rc=$_rc"
  [ $_rc = 0 ] || ok=0
}

# fdb_where : where br0's forwarding database puts $MAC: "fdb=<port>:<age s>", or fdb=none
# (from /sys/class/net/br0/brforward: 16-byte records, mac[6] port_no is_local ageing[4] ...).
fdb_where() {
  _m=$(echo "$MAC" | tr ':' ' ')
  # shellcheck disable=SC2046  # the record's fields, word-split on purpose
  set -- $(od -An -tx1 -v -w16 /sys/class/net/br0/brforward | awk -v m="$_m" '
    { s = $1; for (j = 2; j <= 6; j++) s = s " " $j }
    s == m { print $7, $9, $10; exit }')
  [ $# = 3 ] || { echo "fdb=none"; return; }
  _age=$(( (0x$2 + 256 * 0x$3) / 100 ))
  for _p in /sys/class/net/br0/brif/*; do
    [ $(( $(cat "$_p/port_no") )) = $((0x$1)) ] && { echo "fdb=${_p##*/}:${_age}s"; return; }
  done
  echo "fdb=port$((0x$1)):${_age}s"
}

# ---- the two VMMs: start, unplug, re-plug, stop ----
tandem_start() {
  rm -f "$TS"
  vmm_start tandem "$TANDEM" --kernel "$L2_KERNEL" --initramfs "$L2_INITRD" --memory 512M --cpus 1 \
    --api-socket "$TS" --net "tap=$TAP,id=sb0,standby=on,mac=$MAC" \
    --vf "pf=$PF,index=0,create=on,failover=sb0,id=vf0" \
    --disk "path=$IMG,readonly=on,id=script" --cmdline "$CMD"
}
tandem_unplug() { "$TANDEM" ctl --api-socket "$TS" device-remove vf0 > /tmp/fo-ctl.unplug 2>&1; }
tandem_replug() { "$TANDEM" ctl --api-socket "$TS" device-add vf0 > /tmp/fo-ctl.replug 2>&1; }
tandem_stop() { "$TANDEM" ctl --api-socket "$TS" shutdown > /tmp/fo-ctl.stop 2>&1; }
tandem_after() { :; }

# The VF comes by QMP device_add, QEMU paused (-S) until then: QEMU keeps the options of a
# failover primary given by -device (it stays hidden until the guest negotiates STANDBY),
# and a later device_add of the same id (the re-plug) then fails with "Duplicate ID".
qemu_start() {
  echo 1 > "$PFD/sriov_numvfs"
  VF=$(basename "$(readlink "$PFD/virtfn0")")
  echo vfio-pci > "/sys/bus/pci/devices/$VF/driver_override"
  echo "$VF" > /sys/bus/pci/drivers_probe
  $IPROUTE link set "$PF" vf 0 mac "$MAC"
  qemu_vf='{"execute": "device_add", "arguments": {"driver": "vfio-pci", "host": "'"$VF"'", "id": "hostdev0", "bus": "rp1", "failover_pair_id": "net0", "romfile": ""}}'
  rm -f "$QS"
  vmm_start qemu qemu-system-x86_64 -M q35 -accel kvm -cpu host -smp 1 -m 512M \
    -nodefaults -no-user-config -no-reboot -display none -serial stdio -S \
    -qmp "unix:$QS,server=on,wait=off" \
    -kernel "$L2_KERNEL" -initrd "$L2_INITRD" -append "$CMD" \
    -drive "if=none,id=sd0,file=$IMG,format=raw,readonly=on,aio=threads,cache=writeback" \
    -device virtio-blk-pci,drive=sd0,id=script,serial=script \
    -netdev "tap,id=hn0,ifname=$TAP,script=no,downscript=no,vhost=off" \
    -device "virtio-net-pci,netdev=hn0,id=net0,mac=$MAC,failover=on,romfile=" \
    -device pcie-root-port,id=rp1,chassis=1
  qmpc -t 60 "$QS" "$qemu_vf" '{"execute": "cont"}' > /tmp/fo-ctl.start 2>&1
}
qemu_unplug() {
  qmpc -t 60 "$QS" '{"execute": "device_del", "arguments": {"id": "hostdev0"}}' \
    event=DEVICE_DELETED,'"hostdev0"' > /tmp/fo-ctl.unplug 2>&1 || return 1
  $IPROUTE link set "$PF" vf 0 mac 00:00:00:00:00:00 || return 1
  # br0 learnt the guest's MAC on the PF (the VF's broadcasts loop back to the PF): unless
  # it forgets, it drops L0's frames for the guest until the guest happens to send over the
  # standby (its next ARP probe, seconds later). QEMU does nothing about that; give it its
  # best case (fo_qemu_fdb=flush, the default), or measure it plain (fo_qemu_fdb=keep).
  [ "$qemu_fdb" = keep ] || echo 1 > "/sys/class/net/br0/brif/$PF/flush"
}
qemu_replug() {
  $IPROUTE link set "$PF" vf 0 mac "$MAC" || return 1
  qmpc -t 60 "$QS" "$qemu_vf" > /tmp/fo-ctl.replug 2>&1
}
qemu_stop() { qmpc "$QS" '{"execute": "quit"}' > /tmp/fo-ctl.stop 2>&1; }
qemu_after() {
  [ -e "/sys/bus/pci/devices/$VF/driver" ] && echo "$VF" > "/sys/bus/pci/devices/$VF/driver/unbind"
  echo > "/sys/bus/pci/devices/$VF/driver_override"
  $IPROUTE link set "$PF" vf 0 mac 00:00:00:00:00:00
  echo 0 > "$PFD/sriov_numvfs"
}

# scenario VMM : one failover scenario of VMM, labelled run=$r; rc 0 when every step worked,
# 2 when the guest never got ready (a guest that hung in the bed, before anything measured).
scenario() {
  v=$1 ok=1
  rm -f /tmp/fo-ctl.*
  echo 1 > /sys/class/net/br0/bridge/flush   # no learnt entry from the previous guest
  ev boot
  if ${v}_start && vmm_wait_log "$v" "FOG ready" 120; then
    ev ready
    echo "PINGMON on"
    # The context lines fork several programs: not next to a transition.
    echo "FOINFO vmm=$v run=$r before $(vf_state "$PF" 0) $(fdb_where)"
    sleep 5
    step unplug unplugged
    sleep "$secs"
    echo "FOINFO vmm=$v run=$r parked $(vf_state "$PF" 0) $(fdb_where)"
    sleep 1
    step replug replugged
    vmm_wait_log "$v" "FOG vf-rx" 60 || { ok=0; echo "FOINFO vmm=$v run=$r no vf-rx from the guest"; }
    sleep 5
    ev end
    echo "PINGMON off"
    echo "FOINFO vmm=$v run=$r back $(vf_state "$PF" 0) $(fdb_where)"
    vmm_wait_log "$v" "FOG tcp" 30 || echo "FOINFO vmm=$v run=$r no TCP report from the guest"
    sleep 1
    ${v}_stop || ok=0
  else
    ok=2
    echo "FOINFO vmm=$v run=$r no FOG ready"
    ${v}_stop
  fi
  _rc=$(vmm_end "$v" 60)
  ev "exit rc=$_rc"
  [ "$_rc" = 0 ] || [ $ok = 2 ] || ok=0
  ${v}_after
  echo "FOINFO vmm=$v run=$r after $(vf_state "$PF" 0)"
  for _f in /tmp/fo-ctl.*; do
    [ -f "$_f" ] && tr -d '\r' < "$_f" | sed "s/^/FOINFO vmm=$v run=$r ${_f#/tmp/fo-ctl.}: /"
  done
  if [ $ok != 1 ]; then
    echo "--- $v run $r failed (VMM rc=$_rc), its output:"
    sed 's/^/  | /' "/tmp/fo-$v.log" | tail -n 40
  fi
  [ $ok = 1 ] && return 0
  [ $ok = 2 ] && return 2
  return 1
}

fail=0
i=1
while [ "$i" -le "$runs" ]; do
  if [ $((i % 2)) = 1 ]; then order="tandem qemu"; else order="qemu tandem"; fi
  for vm in $order; do
    case " $vmms " in
      *" $vm "*)
        # A guest that hung before it was ready (the nested bed's own fault) is booted
        # once more under its own label (run=<round>.2); its failed attempt stays on record.
        r=$i
        scenario "$vm"; _s=$?
        if [ $_s = 2 ]; then
          r=$i.2
          echo "FOINFO vmm=$vm round $i: the guest never got ready; once more as run=$r"
          scenario "$vm"; _s=$?
        fi
        [ $_s = 0 ] || fail=1 ;;
    esac
  done
  i=$((i + 1))
done
$IPROUTE link del br0
tap_down "$TAP"
exit $fail
