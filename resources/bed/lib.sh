# shellcheck shell=dash
# /lib/bed.sh in L1 (resources/bed/lib.sh, copied in by build-l1.sh): helpers for L1
# scenarios, in busybox sh. A scenario sources it: `. /lib/bed.sh`.
#
# Variables (a scenario may set TANDEM and RUN_TIMEOUT before or after sourcing):
#   L2_KERNEL=/l2/vmlinuz  L2_INITRD=/l2/initrd.gz (lean, for boot tests)
#   L2_INITRD_TOOLS=/l2/initrd-tools.gz (+ iperf3 and blkbench, for net/disk tests)
#   L2_CMDLINE, L2_SCRIPT_CMDLINE    the guest's command line (the second runs a script disk)
#   L2_NMI_DUMP                      append to a command line for vm_bed_fault: `tandem ctl nmi`
#                                    then makes a stuck guest print its stacks
#   IPROUTE=/sbin/ip  iproute2's ip. Call it by that path: Debian's static busybox sh runs its
#                     own applet for a bare `ip` (and nc, dd, ...) whatever PATH says
#   TANDEM (default: tandem)  the VMM run_tandem starts
#   RUN_TIMEOUT (default 300) seconds a run may take before it is killed
#
# Handing L2 a script: the L2 /init with tandem.action=script runs the script it finds on
# a virtio disk (see resources/guest/init.sh):
#   mkscript_disk FILE SCRIPT|-     a raw image (64 KiB multiple) for --disk path=FILE,readonly=on:
#                                   "# TANDEM-L2-SCRIPT", the L2 helpers (/lib/l2-script-lib.sh,
#                                   i.e. resources/guest/script-lib.sh), then SCRIPT (a file,
#                                   or - for stdin), NUL-padded. The guest prints its output
#                                   on its console and ends with "TANDEM-L2-SCRIPT-EXIT rc=<n>".
# Disks:
#   mkdisk FILE SIZE [SEED]         a raw image of SIZE (K/M/G suffixes): zeros (sparse), or
#                                   blkbench's pattern of SEED over the whole of it
# Network (traffic stays between L1 and its L2 guests on these taps):
#   tap_up NAME ADDR/PREFIX [multi_queue]   creates a persistent tap in L1, gives it ADDR and
#                                   brings it up ("multi_queue" for a VMM that opens it with
#                                   IFF_MULTI_QUEUE, i.e. --net ...,queues=N>1)
#   tap_down NAME                   deletes it
#   iperf3_server ADDR              an iperf3 server in L1, bound to ADDR, in the background
#                                   (one per address)
#   iperf3_server_stop              stops all of them
# SR-IOV (run-l1.sh --iommu --igb):
#   igb_pf_up ADDR/PREFIX           brings the igb PF (8086:10c9) up with ADDR, waits (10 s at
#                                   most) for its carrier, prints its interface name
#   vf_state PF INDEX               one line: VF INDEX's bdf= driver= mac= (iproute2's view from
#                                   the PF) and the PF's numvfs=; bdf=- when there is no such VF
# Runs (each bracketed "RUN-BEGIN <name>" ... "RUN-END <name> rc=<status>" for the harness):
#   run_tandem NAME ARGS...         $TANDEM ARGS in the foreground (stdin /dev/null), its
#                                   output inline; returns its status (124/137: timed out)
#   run_bg NAME CMD...              CMD in the background, output to /tmp/run-NAME.log;
#                                   prints "RUN-BG <name> pid=<pid>" (not RUN-BEGIN: the
#                                   bracketed block is printed whole by run_end, so lines L1
#                                   prints meanwhile stay outside it)
#   run_wait_for NAME REGEX [SECS]  waits (default 120 s) until that output has a line
#                                   matching REGEX (grep -E); rc 1 if the run ended first or
#                                   on timeout
#   run_wait_count NAME TEXT N SECS waits until that output has N lines containing TEXT
#                                   (grep, not -E); rc 1 if the run ended first or on timeout
#   run_ended NAME                  rc 0 once the run's command has exited
#   run_signal NAME [SIG]           sends SIG (default TERM) to the run's command
#   run_end NAME [SHOWN]            waits for it, prints RUN-BEGIN, its output, RUN-END
#                                   (under the name SHOWN if given); returns its status
#   run_vm NAME ARGS...             run_tandem for a guest that ends by itself (its command
#                                   line with $L2_NMI_DUMP): tandem ARGS --api-socket in the
#                                   background; a guest still running after $VM_STUCK_SECS
#                                   (default 240) is diagnosed (vm_stuck_report, vm_bed_fault)
#                                   and, when that shows the bed's own fault, run again once.
#                                   A faulted attempt is printed as run NAME~fault, the last
#                                   as NAME; returns tandem's status in the last
#   run_console NAME [all]          the run's output so far, tandem's own messages taken out
#                                   of the guest lines they landed in, without a last line
#                                   still being written unless "all" (see below)
#   vm_stuck_report NAME [SOCKET]   "L1-STUCK ..." lines on a run whose guest stopped: its
#                                   threads' states, exit counters, KVM's exits (see below)
#   vm_bed_fault NAME SOCKET        NMIs that guest for its stacks ("L1-BT ..." lines; the
#                                   guest panics and the run ends); rc 0 and a line
#                                   "L1-BED-FAULT ..." when they show the bed's fault (below)
# Driving a guest whose script runs l2_serve (over the tap; traffic stays in L1):
#   l2_exec HOST CMD                runs the sh command line CMD in the guest at HOST (port
#                                   $L2_AGENT_PORT, default 7000; $L2_EXEC_TIMEOUT s at most,
#                                   default 300), prints its stdout+stderr, returns its status
#                                   (255: no answer)
#   l2_wait_serve HOST [SECS]       waits (default 300 s) until the agent at HOST answers
#   l2_quit HOST                    makes the guest's l2_serve return (its script goes on)
# Also from /lib/l2-script-lib.sh (sourced here): tcp_recv PORT [SEED], tcp_send HOST PORT
# SEED LEN (TCP-RECV / TCP-SENT lines), and the l2_* functions (meant for L2).
# Parsing:
#   kv KEY WORDS...                 the value of the first word KEY=value (rc 1: none), e.g.
#                                   kv iops "$(grep 'BLKBENCH mode=randread' log)"

. /lib/l2-script-lib.sh

L2_KERNEL=/l2/vmlinuz
L2_INITRD=/l2/initrd.gz
L2_INITRD_TOOLS=/l2/initrd-tools.gz
L2_CMDLINE="console=ttyS0 panic=-1 loglevel=4"
# Only where a scenario watches for stuck guests: an NMI that nobody claims then panics the
# guest with its stacks on the console instead of being ignored.
L2_NMI_DUMP="unknown_nmi_panic=1"
L2_SCRIPT_CMDLINE="$L2_CMDLINE tandem.action=script"
IPROUTE=/sbin/ip
TANDEM=${TANDEM:-tandem}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}

mkscript_disk() {
  [ $# = 2 ] || { echo "usage: mkscript_disk FILE SCRIPT|-" >&2; return 2; }
  {
    echo "# TANDEM-L2-SCRIPT"
    cat /lib/l2-script-lib.sh
    echo "# ---- the script ----"
    if [ "$2" = - ]; then cat; else cat "$2"; fi
  } > "$1" || return 1
  _sz=$(wc -c < "$1")
  truncate -s $(( (_sz + 65535) / 65536 * 65536 )) "$1"
}

mkdisk() {
  [ $# -ge 2 ] || { echo "usage: mkdisk FILE SIZE [SEED]" >&2; return 2; }
  rm -f "$1"
  if [ -n "${3:-}" ]; then
    blkbench gen "$3" "$2" > "$1"
  else
    truncate -s "$2" "$1"
  fi
}

tap_up() {
  [ $# -ge 2 ] || { echo "usage: tap_up NAME ADDR/PREFIX [multi_queue]" >&2; return 2; }
  $IPROUTE tuntap add dev "$1" mode tap ${3:+multi_queue} || return 1
  $IPROUTE addr add "$2" dev "$1" && $IPROUTE link set "$1" up
}

tap_down() {
  $IPROUTE link del "$1"
}

iperf3_server() {
  iperf3 -s -B "$1" -D -I "/tmp/iperf3-server.$1.pid"
}

iperf3_server_stop() {  # all of them; iperf3 removes its pid file itself when it ends
  for _f in /tmp/iperf3-server.*.pid; do
    [ -f "$_f" ] && kill "$(cat "$_f")" 2>/dev/null
  done
  return 0
}

igb_pf_up() {
  for _d in /sys/bus/pci/devices/*; do
    [ "$(cat "$_d/vendor"):$(cat "$_d/device")" = 0x8086:0x10c9 ] || continue
    _pf=$(ls "$_d/net" 2>/dev/null | head -n 1)
    [ -n "$_pf" ] || continue
    $IPROUTE addr add "$1" dev "$_pf" && $IPROUTE link set "$_pf" up || return 1
    _i=0
    until grep -q 1 "/sys/class/net/$_pf/carrier" 2>/dev/null || [ $_i -ge 50 ]; do
      sleep 0.2; _i=$((_i + 1))
    done
    echo "$_pf"
    return 0
  done
  echo "igb_pf_up: no igb PF (run-l1.sh --iommu --igb)" >&2
  return 1
}

vf_state() {
  _pfd=/sys/class/net/$1/device
  _vf=-; _drv=-
  if [ -e "$_pfd/virtfn$2" ]; then
    _vf=$(basename "$(readlink "$_pfd/virtfn$2")")
    [ -e "$_pfd/virtfn$2/driver" ] && _drv=$(basename "$(readlink "$_pfd/virtfn$2/driver")")
  fi
  _mac=$($IPROUTE link show "$1" | awk -v vf="$2" '$1 == "vf" && $2 == vf { print $4 }' | tr -d ,)
  echo "bdf=$_vf driver=$_drv mac=${_mac:--} numvfs=$(cat "$_pfd/sriov_numvfs")"
}

run_tandem() {
  _n=$1; shift
  echo "RUN-BEGIN $_n"
  timeout -k 10 "$RUN_TIMEOUT" "$TANDEM" "$@" </dev/null
  _rc=$?
  echo "RUN-END $_n rc=$_rc"
  return $_rc
}

run_bg() {
  _n=$1; shift
  rm -f "/tmp/run-$_n.log" "/tmp/run-$_n.rc" "/tmp/run-$_n.pid"
  # busybox timeout execs CMD in its own process: the pid of the background job is CMD's.
  ( timeout -k 10 "$RUN_TIMEOUT" "$@" </dev/null > "/tmp/run-$_n.log" 2>&1 &
    echo $! > "/tmp/run-$_n.pid"
    wait $!
    echo $? > "/tmp/run-$_n.rc" ) &
  echo $! > "/tmp/run-$_n.job"
  while [ ! -s "/tmp/run-$_n.pid" ]; do sleep 0.05; done
  echo "RUN-BG $_n pid=$(cat "/tmp/run-$_n.pid")"
}

# run_console NAME : the guest's serial console and tandem's stderr share the run's log,
# and tandem writes a whole message between two bytes of a guest line now and then
# ("L2-ED" "tandem: edu: removed (...)\n" "U-GONE n=5\n"). Each message goes on its own
# line here and the guest line is joined again. A guest line still being written (no
# newline yet) is left out.
run_console() {
  # The guest may be halfway through a line: leave an unterminated last line out. One
  # snapshot for both looks, or the guest can add half a line between them.
  _snap=$(mktemp) || return 1
  cat "/tmp/run-$1.log" > "$_snap" 2>/dev/null
  _partial=1
  [ -z "$(tail -c 1 "$_snap")" ] || [ "${2:-}" = all ] && _partial=0
  awk -v partial=$_partial '
    function out(l) { if (held) print line; line = l; held = 1 }
    { if (carry != "") { $0 = carry $0; carry = "" }
      p = index($0, "tandem: ")
      if (p > 1) { carry = substr($0, 1, p - 1); out(substr($0, p)); next }
      out($0) }
    END { if (carry != "") out(carry); if (held && !partial) print line }' "$_snap"
  rm -f "$_snap"
}

run_ended() { [ -s "/tmp/run-$1.rc" ]; }

run_wait_count() {
  _i=0
  while [ "$(run_console "$1" | grep -c "$2")" -lt "$3" ] && [ $_i -lt $(($4 * 10)) ] && ! run_ended "$1"; do
    sleep 0.1; _i=$((_i + 1))
  done
  [ "$(run_console "$1" | grep -c "$2")" -ge "$3" ]
}

run_wait_for() {
  _n=$1 _re=$2 _t=${3:-120}
  _end=$(( $(date +%s) + _t ))
  while :; do
    run_console "$_n" | grep -qE "$_re" && return 0
    if run_ended "$_n"; then
      run_console "$_n" | grep -qE "$_re"
      return
    fi
    [ "$(date +%s)" -ge $_end ] && return 1
    sleep 0.2
  done
}

run_signal() {
  kill -s "${2:-TERM}" "$(cat "/tmp/run-$1.pid")"
}

run_end() {
  _n=$1
  wait "$(cat "/tmp/run-$_n.job")" 2>/dev/null
  until run_ended "$_n"; do sleep 0.2; done
  _rc=$(cat "/tmp/run-$_n.rc")
  echo "RUN-BEGIN ${2:-$_n}"
  run_console "$_n" all
  echo "RUN-END ${2:-$_n} rc=$_rc"
  return "$_rc"
}

# The bed's own fault (an interrupt L2 takes with interrupts disabled; see vm_bed_fault)
# stops a guest anywhere, at any time: a run that would then only time out is asked
# where its guest is, and made again when the answer is the bed's fault. A guest stuck
# for any other reason is not made again: the NMI's panic ends its run, stacks on its
# console, and the test that reads it fails.
run_vm() {
  _rvn=$1; shift
  _rvtry=1
  while :; do
    rm -f "/tmp/$_rvn.sock"
    run_bg "$_rvn" "$TANDEM" "$@" --api-socket "/tmp/$_rvn.sock"
    _rvw=0
    until run_ended "$_rvn" || [ $_rvw -ge $((${VM_STUCK_SECS:-240} * 5)) ]; do sleep 0.2; _rvw=$((_rvw + 1)); done
    run_ended "$_rvn" && { run_end "$_rvn"; return; }
    echo "L1-RUN-STUCK $_rvn attempt=$_rvtry after=${VM_STUCK_SECS:-240}s"
    vm_stuck_report "$_rvn" "/tmp/$_rvn.sock"
    _rvfault=1
    vm_bed_fault "$_rvn" "/tmp/$_rvn.sock" && _rvfault=0
    # The NMI's panic ends the run; SIGTERM in case it did not (tandem gives devices back).
    run_ended "$_rvn" || { sleep 5; run_ended "$_rvn" || run_signal "$_rvn" TERM; }
    if [ $_rvfault = 0 ] && [ $_rvtry -lt 2 ]; then
      run_end "$_rvn" "$_rvn~fault"
      _rvtry=$((_rvtry + 1))
      continue
    fi
    run_end "$_rvn"
    return
  done
}

# vm_stuck_report NAME [SOCKET] : when a run's guest stopped answering, what its VMM's
# threads are doing (a vCPU in R is running guest code), its exit counters twice 2 s apart
# (no change: the guest makes no exits to the VMM), and a 1 s sample of KVM's exits with
# the guest's RIP (L1's tracefs): lines "L1-STUCK ...".
vm_stuck_report() {
  _p=$(cat "/tmp/run-$1.pid")
  for _t in /proc/$_p/task/*; do
    # utime includes guest time (stat field 43): guest_time ~ utime is time in the guest.
    echo "L1-STUCK task=$(cat $_t/comm) state=$(awk '{print $3}' $_t/stat) wchan=$(cat $_t/wchan) $(awk '{print "utime=" $14, "stime=" $15, "guest_time=" $43}' $_t/stat)"
  done
  sleep 2
  for _t in /proc/$_p/task/*; do
    [ "$(cat $_t/comm)" = vcpu0 ] && echo "L1-STUCK 2s-later task=vcpu0 $(awk '{print "utime=" $14, "stime=" $15, "guest_time=" $43}' $_t/stat) syscall=$(cut -d' ' -f1 $_t/syscall)"
  done
  if [ -n "${2:-}" ]; then
    for _k in 1 2; do
      echo "L1-STUCK exits=$(timeout 5 $TANDEM ctl --api-socket "$2" counters 2>&1 | tr -d '\n ' | sed 's/.*"vm_exits"://')"
      [ $_k = 1 ] && sleep 2
    done
  fi
  _tr=/sys/kernel/debug/tracing
  [ -d $_tr/events ] || mount -t debugfs none /sys/kernel/debug 2>/dev/null
  if [ -e $_tr/events/kvm/kvm_exit/enable ]; then
    echo > $_tr/trace
    echo 1 > $_tr/events/kvm/kvm_exit/enable
    sleep 1
    echo 0 > $_tr/events/kvm/kvm_exit/enable
    grep -v '^#' $_tr/trace | awk '{ $1 = $2 = $3 = $4 = ""; print }' | sort | uniq -c | sort -rn | head -n 8 \
      | sed 's/^/L1-STUCK kvm_exit /'
  fi
}

# vm_bed_fault NAME SOCKET : where a stopped guest is, from its own stack dump. The bed has
# a fault of its own, measured: now and then (one hot-plug in 10 to 20) the vCPU that L1's
# KVM runs on QEMU's emulated SVM takes an interrupt while the guest has interrupts
# disabled, nested in a handler that holds a lock (seen: the timer interrupt inside the
# timer interrupt, spinning on the timekeeping seqcount it holds itself). Neither tandem nor
# Linux can make that happen: only the CPU delivers interrupts, and x86 does not while
# EFLAGS.IF is clear. The dump shows it as an interrupt entry whose interrupted frame has
# IF clear; that, and only that, is reported as the bed's fault.
vm_bed_fault() {
  _log=/tmp/run-$1.log
  _n=$(wc -l < "$_log")
  $TANDEM ctl --api-socket "$2" nmi > /dev/null 2>&1 || { echo "L1-BT no NMI: the VMM did not take it"; return 1; }
  _i=0
  # The dump ends with the panic, or with the VMM, which pvpanic told of it.
  until tail -n +$((_n + 1)) "$_log" | grep -q "end Kernel panic" || run_ended "$1" || [ $_i -ge 100 ]; do
    sleep 0.1; _i=$((_i + 1))
  done
  tail -n +$((_n + 1)) "$_log" | head -n 150 | sed 's/^/L1-BT /'
  # An interrupt entry (asm_sysvec_*, asm_common_interrupt), then within a few lines the
  # frame it interrupted: "RIP: ..." and "EFLAGS: xxxxxxxx". IF is 0x200: the sixth hex
  # digit of eight, set when it is one of 2367abef.
  _f=$(tail -n +$((_n + 1)) "$_log" | awk '
    /asm_sysvec_|asm_common_interrupt/ { at = NR; entry = $NF; rip = ""; next }
    at && NR <= at + 4 && /RIP: / { rip = $0; sub(/.*RIP: [0-9a-f]*:/, "", rip); next }
    at && NR <= at + 4 && /EFLAGS: / {
      e = $0; sub(/.*EFLAGS: /, "", e)
      if (index("2367abef", substr(e, 6, 1)) == 0) { print entry " taken at " rip " with EFLAGS " substr(e, 1, 8); exit }
      at = 0
    }')
  [ -n "$_f" ] || return 1
  echo "L1-BED-FAULT interrupt with interrupts disabled: $_f"
}

l2_exec() {
  _h=$1; shift
  printf '%s\n' "{ $*
} 2>&1" 'echo "L2-EXEC-RC $?"' \
    | timeout "${L2_EXEC_TIMEOUT:-300}" nc "$_h" "${L2_AGENT_PORT:-7000}" > "/tmp/l2-exec.$_h.out" 2>/dev/null
  _rc=$(awk '$1 == "L2-EXEC-RC" { r = $2 } END { print (r == "" ? 255 : r) }' "/tmp/l2-exec.$_h.out")
  grep -v '^L2-EXEC-RC ' "/tmp/l2-exec.$_h.out"
  return "$_rc"
}

l2_wait_serve() {
  _end=$(( $(date +%s) + ${2:-300} ))
  until L2_EXEC_TIMEOUT=10 l2_exec "$1" true; do
    [ "$(date +%s)" -ge $_end ] && return 1
    sleep 1
  done
}

l2_quit() {
  l2_exec "$1" "touch /tmp/l2-quit"
}

kv() {
  _k=$1; shift
  for _w in $*; do
    # Lines from a guest console end in \r\n: no \r in the value.
    case $_w in "$_k"=*) echo "${_w#*=}" | tr -d '\r'; return 0 ;; esac
  done
  return 1
}
