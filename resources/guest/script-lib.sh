# shellcheck shell=dash
# Helpers for L2 test scripts (busybox sh). Not part of the L2 image: mkscript_disk
# (resources/bed/lib.sh, in L1) puts this file at the top of every script disk, so a
# script can call these directly. Each prints lines "L2-<WHAT> key=value ...".
#
#   l2_net_up ADDR/PREFIX [IFACE]  lo and IFACE (default eth0) up with that address, then
#                                  waits up to 10 s for the link; prints
#                                  L2-NET-UP if=<if> addr=<a/p> mac=<mac> state=<operstate>
#                                  returns 1 if the interface does not exist
#   l2_net_report                  L2-NET if=<if> mac= mtu= driver= rxq=<n> txq=<n> state=
#                                  for every interface but lo
#   l2_blk_report                  L2-BLK dev=<vdX> sectors=<512-byte> ro=<0|1> serial=<s|->
#                                  pci=<bdf|-> script=<0|1> for every /dev/vd*
#   l2_data_disks                  the vd* names, script disk excluded, in name order
#   l2_disk_by_serial SERIAL       the vd* name whose virtio serial is SERIAL (rc 1: none)
#   l2_if_by_driver DRIVER         the first interface bound to DRIVER, e.g. igbvf (rc 1: none)
#   l2_irq_count PATTERN           the sum over CPUs of /proc/interrupts lines matching PATTERN
#   l2_pci_report                  one line per PCI function:
#       L2-PCI bdf=0000:00:02.0 vendor=0x1af4 device=0x1041 class=0x020000 driver=virtio-pci
#              virtio=virtio_net irq=<legacy irq> cfg_size=<256|4096> msix=<on|off|none>
#              msix_table=<entries|0> msi_irqs=<n msi(x) vectors allocated>
#              bars=<i>:<start>+<size>:<io|mem32|mem64>[p],...  (or bars=-)
#       msix is read from the MSI-X capability in config space (Message Control bit 15).
#   l2_serve [PORT]                 the guest agent: serves L1's l2_exec on PORT (default
#                                   7000; each TCP connection's text runs in a new busybox
#                                   sh, its output goes back on the connection), prints
#                                   L2-SERVE port=<p>, and returns once L1 ran l2_quit
# TANDEM_SCRIPT_DEV is set by /init to the script disk's name (e.g. vdb).
#
# Shared with L1 (its /lib/bed.sh sources this file too):
#   tcp_recv PORT [SEED]            accepts one TCP connection on PORT (any local address;
#                                   gives up after $TCP_TIMEOUT s, default 600, counted from
#                                   the call), reads it to its end; prints
#                                   TCP-RECV port=<p> bytes=<n> sha256=<hex>
#                                   [seed=<s> pattern=ok|bad bad_at=<-1|offset>]  (SEED: the
#                                   data is checked against `blkbench gen SEED`)
#   tcp_send HOST PORT SEED LEN     sends `blkbench gen SEED LEN` to HOST:PORT (retrying for
#                                   up to ~30 s while nothing listens yet); prints
#                                   TCP-SENT host=<h> port=<p> seed=<s> len=<n> rc=<nc status>
#   Why not plain nc: busybox nc half-closes its socket when its stdin ends and exits when the
#   peer half-closes, so a receiver whose stdin is /dev/null cuts the sender short. tcp_recv
#   holds its stdin open on a FIFO.

l2_net_up() {
  _if=${2:-eth0}
  ip link set lo up
  [ -e "/sys/class/net/$_if" ] || { echo "L2-NET-UP if=$_if error=no-such-interface"; return 1; }
  ip addr add "$1" dev "$_if"
  ip link set "$_if" up
  _i=0
  while [ "$(cat "/sys/class/net/$_if/operstate")" != up ] && [ $_i -lt 50 ]; do
    sleep 0.2; _i=$((_i + 1))
  done
  echo "L2-NET-UP if=$_if addr=$1 mac=$(cat "/sys/class/net/$_if/address") state=$(cat "/sys/class/net/$_if/operstate")"
}

l2_net_report() {
  for _n in /sys/class/net/*; do
    _if=${_n##*/}
    [ "$_if" = lo ] && continue
    _drv=-
    [ -e "$_n/device/driver" ] && _drv=$(basename "$(readlink "$_n/device/driver")")
    echo "L2-NET if=$_if mac=$(cat "$_n/address") mtu=$(cat "$_n/mtu") driver=$_drv" \
      "rxq=$(ls -d "$_n"/queues/rx-* 2>/dev/null | wc -l) txq=$(ls -d "$_n"/queues/tx-* 2>/dev/null | wc -l)" \
      "state=$(cat "$_n/operstate")"
  done
}

# The PCI function of a virtio disk: /sys/block/vdX/device is the virtio device, whose parent
# is the PCI function.
_l2_blk_pci() {
  _p=$(readlink -f "/sys/block/$1/device/..")
  case ${_p##*/} in *:*:*.*) echo "${_p##*/}" ;; *) echo - ;; esac
}

l2_blk_report() {
  for _b in /sys/block/vd*; do
    [ -e "$_b" ] || continue
    _d=${_b##*/}
    _s=$(cat "$_b/serial" 2>/dev/null); [ -n "$_s" ] || _s=-
    _sc=0; [ "$_d" = "${TANDEM_SCRIPT_DEV:-}" ] && _sc=1
    echo "L2-BLK dev=$_d sectors=$(cat "$_b/size") ro=$(cat "$_b/ro") serial=$_s pci=$(_l2_blk_pci "$_d") script=$_sc"
  done
}

l2_data_disks() {
  for _b in /sys/block/vd*; do
    [ -e "$_b" ] || continue
    [ "${_b##*/}" = "${TANDEM_SCRIPT_DEV:-}" ] || echo "${_b##*/}"
  done
}

l2_disk_by_serial() {
  for _b in /sys/block/vd*; do
    [ -e "$_b" ] || continue
    [ "$(cat "$_b/serial" 2>/dev/null)" = "$1" ] && { echo "${_b##*/}"; return 0; }
  done
  return 1
}

l2_if_by_driver() {
  for _n in /sys/class/net/*; do
    [ -e "$_n/device/driver" ] || continue
    [ "$(basename "$(readlink "$_n/device/driver")")" = "$1" ] && { echo "${_n##*/}"; return 0; }
  done
  return 1
}

l2_irq_count() {
  awk -v pat="$1" -v cpus="$(grep -c '^processor' /proc/cpuinfo)" \
    '$0 ~ pat { for (i = 2; i <= cpus + 1; i++) n += $i } END { print n + 0 }' /proc/interrupts
}

_l2_cfg_u8() { od -An -tu1 -j "$2" -N 1 "$1" | tr -d ' \n'; }

l2_pci_report() {
  for _p in /sys/bus/pci/devices/*; do
    [ -e "$_p/config" ] || continue
    _cfg=$_p/config
    _drv=-; [ -e "$_p/driver" ] && _drv=$(basename "$(readlink "$_p/driver")")
    _vd=-
    for _v in "$_p"/virtio*; do
      [ -e "$_v/driver" ] && _vd=$(basename "$(readlink "$_v/driver")")
    done
    # MSI-X: walk the capability list (status bit 4 says there is one; pointer at 0x34).
    _msix=none _tbl=0
    if [ $(( $(_l2_cfg_u8 "$_cfg" 6) & 16 )) -ne 0 ]; then
      _c=$(( $(_l2_cfg_u8 "$_cfg" 52) & 252 )) _k=0
      while [ "$_c" -ge 64 ] && [ $_k -lt 48 ]; do
        if [ "$(_l2_cfg_u8 "$_cfg" $_c)" = 17 ]; then
          _lo=$(_l2_cfg_u8 "$_cfg" $((_c + 2))) _hi=$(_l2_cfg_u8 "$_cfg" $((_c + 3)))
          if [ $((_hi & 128)) -ne 0 ]; then _msix=on; else _msix=off; fi
          _tbl=$(( ((_hi & 7) * 256 + _lo) + 1 ))
          break
        fi
        _c=$(( $(_l2_cfg_u8 "$_cfg" $((_c + 1))) & 252 )) _k=$((_k + 1))
      done
    fi
    _nirq=0
    [ -d "$_p/msi_irqs" ] && _nirq=$(ls "$_p/msi_irqs" | wc -l)
    # BARs: the first 6 lines of "resource" (start end flags); flags: 0x100 io, 0x200 mem,
    # 0x2000 prefetchable, 0x100000 64-bit.
    _bars="" _i=0
    while read -r _st _en _fl; do
      [ $_i -ge 6 ] && break
      if [ $((_st)) -ne 0 ] || [ $((_en)) -ne 0 ]; then
        if [ $((_fl & 256)) -ne 0 ]; then _t=io
        elif [ $((_fl & 1048576)) -ne 0 ]; then _t=mem64
        else _t=mem32; fi
        [ $((_fl & 8192)) -ne 0 ] && _t=${_t}p
        _bars="$_bars${_bars:+,}$_i:$(printf '0x%x+0x%x' $((_st)) $((_en - _st + 1))):$_t"
      fi
      _i=$((_i + 1))
    done < "$_p/resource"
    echo "L2-PCI bdf=${_p##*/} vendor=$(cat "$_p/vendor") device=$(cat "$_p/device") class=$(cat "$_p/class")" \
      "driver=$_drv virtio=$_vd irq=$(cat "$_p/irq") cfg_size=$(stat -c %s "$_cfg") msix=$_msix" \
      "msix_table=$_tbl msi_irqs=$_nirq bars=${_bars:--}"
  done
}

tcp_recv() {
  _hold=/tmp/.tcp-recv-hold.$$.$1
  rm -f "$_hold"; mkfifo "$_hold"
  # O_RDWR on a FIFO does not block and never reads an end: nc's stdin stays open.
  _r=$(timeout "${TCP_TIMEOUT:-600}" nc -l -p "$1" 0<>"$_hold" | blkbench sum ${2:+"$2"})
  rm -f "$_hold"
  echo "TCP-RECV port=$1 ${_r#BLKBENCH mode=sum }"
}

tcp_send() {
  _t=0
  while :; do
    blkbench gen "$3" "$4" | nc "$1" "$2" 2>/dev/null   # "connection refused" while waiting
    _rc=$?
    [ $_rc = 0 ] || [ $_t -ge 60 ] && break
    _t=$((_t + 1)); sleep 0.5
  done
  echo "TCP-SENT host=$1 port=$2 seed=$3 len=$4 rc=$_rc"
  return $_rc
}

l2_serve() {
  rm -f /tmp/l2-quit
  nc -ll -p "${1:-7000}" -e /bin/sh &
  _ap=$!
  echo "L2-SERVE port=${1:-7000}"
  while [ ! -e /tmp/l2-quit ]; do sleep 0.5; done
  kill $_ap
}
