#!/bin/busybox sh
# shellcheck shell=dash
# /init of L1, the Linux test host that L0's QEMU runs under TCG and in which the VMM under
# test (Tandem, or QEMU 7.2 for comparison) boots L2 with KVM.
#
# Lines for the harness:
#   INSMOD-FAIL <module>          a module of the base image did not load
#   L1-INIT-OK nproc=<n> mem_kb=<MemTotal>
#   L1-NO-SCENARIO                no /scenario.sh (it comes from the overlay archive)
#   L1-SECCOMP <audit record>     a VMM thread made a call outside its seccomp filter (one
#                                 line per thread name and call)
#   L1-SCENARIO-EXIT rc=<rc>      /scenario.sh ran and exited with rc
#   L1-SCENARIO-TIMEOUT after=<s> tandem.scenario_timeout=<s> ran out; L1-STUCK-* lines follow
#                                 (processes, tandem/QEMU threads' kernel stacks, run logs)
# Then L1 powers off, which ends L0's QEMU.
#
# The scenario finds: /bin/tandem (from the overlay), /l2/vmlinuz, /l2/initrd.gz,
# /usr/bin/qemu-system-x86_64 (Debian 12's 7.2), /bin/bootmeter, /dev/kvm, busybox.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm

while read -r m; do
  insmod "/modules/$m.ko" || echo "INSMOD-FAIL $m"
done < /modules/order

# Past this point L1's own kernel messages would interleave with the L2 console lines the
# tests parse. Keep warnings and worse only, unless the L1 command line asks otherwise.
verbose=0
for a in $(cat /proc/cmdline); do
  case $a in tandem.l1_verbose=1) verbose=1 ;; esac
done
[ $verbose = 1 ] || dmesg -n 5
# The kernel rate-limits the audit records it prints (10 per 5 s): with --seccomp log a
# burst of calls outside a filter would lose all but the first few.
echo 0 > /proc/sys/kernel/printk_ratelimit

ip link set lo up
mem=0
while read -r key val _; do
  [ "$key" = MemTotal: ] && { mem=$val; break; }
done < /proc/meminfo
echo "L1-INIT-OK nproc=$(nproc) mem_kb=$mem"

# A scenario that hangs would otherwise run into L0's timeout and leave no trace of why:
# tandem.scenario_timeout=SEC has a watchdog report what is stuck, then power off.
stuck_report() {
  echo "L1-SCENARIO-TIMEOUT after=${1}s"
  ps -o pid,stat,args 2>/dev/null | grep -v ' \[' | sed 's/^/L1-STUCK-PS /'
  for p in $(pidof tandem qemu-system-x86_64); do
    for t in /proc/$p/task/*; do
      echo "L1-STUCK-TASK pid=$p tid=${t##*/} state=$(awk '{print $3}' "$t/stat") wchan=$(cat "$t/wchan")"
      sed "s/^/L1-STUCK-STACK ${t##*/} /" "$t/stack" 2>/dev/null
    done
  done
  for f in /tmp/run-*.log; do
    [ -f "$f" ] && tail -n 40 "$f" | sed "s|^|L1-STUCK-LOG ${f#/tmp/} |"
  done
}
scenario_timeout=""
for a in $(cat /proc/cmdline); do
  case $a in tandem.scenario_timeout=*) scenario_timeout=${a#*=} ;; esac
done

if [ -f /scenario.sh ]; then
  cd /root || true
  sh /scenario.sh &
  scenario=$!
  if [ -n "$scenario_timeout" ]; then
    ( sleep "$scenario_timeout"; stuck_report "$scenario_timeout"; sync; poweroff -f ) &
    watchdog=$!
  fi
  wait $scenario
  _rc=$?
  # Calls a VMM thread made outside its seccomp filter (killed with `on`, let through
  # with `log`), as the kernel's audit log tells them: the first record of each thread
  # and call.
  dmesg | grep -o 'type=1326.*' | awk '{
      k = ""
      for (i = 1; i <= NF; i++) if ($i ~ /^(comm|syscall)=/) k = k " " $i
      if (!(k in seen)) { seen[k] = 1; print "L1-SECCOMP " $0 }
    }'
  echo "L1-SCENARIO-EXIT rc=$_rc"
  [ -z "${watchdog:-}" ] || kill "$watchdog" 2>/dev/null
else
  echo "L1-NO-SCENARIO"
fi
sync
poweroff -f
