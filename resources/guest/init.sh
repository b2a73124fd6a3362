#!/bin/busybox sh
# shellcheck shell=dash
# /init of the L2 guest (the Linux that Tandem boots). Kept short: under nesting every
# console byte and every exit is slow, and the tests time the boot up to the marker line.
#
# Prints exactly one line, which the tests parse:
#   TANDEM-L2-INIT cpus=<online CPUs> mem_kb=<MemTotal> ram_kb=<System RAM in the e820 map, KiB> uptime=<s>
# ram_kb sums the "System RAM" ranges of /sys/firmware/memmap, i.e. the firmware (VMM) memory
# map as the kernel received it, before the kernel reserves anything; mem_kb is what is left.
#
# Then acts on the kernel command line parameter tandem.action=
#   poweroff (default)  poweroff -f
#   reboot              reboot -f
#   shell               an interactive shell on the console, poweroff -f when it exits
#   panic               a kernel panic through sysrq (with panic=-1 the guest then reboots)
#   dmesg               print the kernel log (prefixed "L2-DMESG "), then poweroff -f: a
#                       boot timeline that costs nothing before the marker line
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# Modules chosen at image build time (resources/guest/build-l2.sh, L2_MODULES), in load order.
while read -r m; do
  insmod "/modules/$m.ko" || echo "INSMOD-FAIL $m"
done < /modules/order

ram=0
for d in /sys/firmware/memmap/*; do
  read -r type < "$d/type"
  [ "$type" = "System RAM" ] || continue
  read -r start < "$d/start"; read -r end < "$d/end"
  ram=$((ram + end - start + 1))
done
mem=0
while read -r key val _; do
  [ "$key" = MemTotal: ] && { mem=$val; break; }
done < /proc/meminfo
read -r up _ < /proc/uptime
echo "TANDEM-L2-INIT cpus=$(nproc) mem_kb=$mem ram_kb=$((ram / 1024)) uptime=$up"

action=poweroff
read -r cmdline < /proc/cmdline
for a in $cmdline; do
  case $a in tandem.action=*) action=${a#tandem.action=} ;; esac
done
case $action in
  poweroff) ;;
  reboot) reboot -f ;;
  shell)
    # setsid + cttyhack: a session of its own with the console as controlling terminal,
    # so that job control and ^C work.
    setsid cttyhack sh
    ;;
  panic) echo c > /proc/sysrq-trigger ;;
  dmesg) dmesg | sed 's/^/L2-DMESG /' ;;
  *) echo "TANDEM-L2-BAD-ACTION $action (expected poweroff, reboot, shell, panic or dmesg)" ;;
esac
poweroff -f
