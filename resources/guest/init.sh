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
#   panic               a kernel panic through sysrq (pvpanic reports it when the VMM has
#                       the device; with panic=-1 the guest then reboots)
#   dmesg               print the kernel log (prefixed "L2-DMESG "), then poweroff -f: a
#                       boot timeline that costs nothing before the marker line
#   script              run the shell script found on a virtio disk (below), print
#                       "TANDEM-L2-SCRIPT-EXIT rc=<rc>", sync, poweroff -f
#
# The script disk (made in L1 by mkscript_disk of resources/bed/lib.sh): a raw image whose
# first line is exactly "# TANDEM-L2-SCRIPT", followed by the script text, NUL-padded to its
# size (a multiple of 512). /init takes /dev/<tandem.script_dev=> if given, else the first
# /dev/vd* whose first line is that one, drops the NULs and runs it with busybox sh in /tmp,
# stdin /dev/null, stdout/stderr on the console, TANDEM_SCRIPT_DEV=<vdX> in the environment.
# None found: "TANDEM-L2-SCRIPT-MISSING" and rc=127.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# Modules chosen at image build time (resources/guest/build-l2.sh, L2_MODULES), in load order.
# The virtio ones (virtio*, *failover) only when there is a virtio device: a virtio PCI
# function (vendor 0x1af4) or a virtio-mmio one in ACPI (LNRO0005). Loading them costs
# 0.5-1 s of a nested boot, which the boot benchmark would otherwise pay for nothing.
# Likewise igbvf only when an igb VF (8086:10ca) was passed through, and uio (for QEMU's
# edu test device, 1234:11e8) only with one.
virtio=0 igbvf=0 edu=0
for d in /sys/bus/pci/devices/*; do
  [ -e "$d/vendor" ] || continue
  read -r id < "$d/vendor"
  read -r dev < "$d/device"
  case $id:$dev in
    0x1af4:*) virtio=1 ;;
    0x8086:0x10ca) igbvf=1 ;;
    0x1234:0x11e8) edu=1 ;;
  esac
done
[ -e /sys/bus/acpi/devices/LNRO0005:00 ] && virtio=1
# tandem.modules=igbvf: load it anyway, for a device that arrives later by hot-plug (a
# failover VF, which Tandem plugs once virtio_net has negotiated STANDBY): this /init has
# no udev to load a driver when a device appears.
for a in $(cat /proc/cmdline); do
  case $a in tandem.modules=*igbvf*) igbvf=1 ;; esac
done
while read -r m; do
  case $virtio$m in 0virtio*|0*failover) continue ;; esac
  case $igbvf$m in 0igbvf) continue ;; esac
  case $edu$m in 0uio*) continue ;; esac
  case $m in pvpanic*) continue ;; esac
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
# pvpanic (ACPI QEMU0001), so that a panic from here on ends the VMM with an error instead
# of looking like a reboot. After the marker: the boot benchmark does not time it.
if [ -e /sys/bus/acpi/devices/QEMU0001:00 ]; then
  while read -r m; do
    case $m in pvpanic*) insmod "/modules/$m.ko" || echo "INSMOD-FAIL $m" ;; esac
  done < /modules/order
fi

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
  script)
    dev=""
    for a in $cmdline; do
      case $a in tandem.script_dev=*) dev=${a#tandem.script_dev=} ;; esac
    done
    if [ -z "$dev" ]; then
      for b in /sys/block/vd*; do
        [ -e "$b" ] || continue
        # One sector only: a data disk has no newline to stop at.
        l=$(dd if="/dev/${b##*/}" bs=512 count=1 2>/dev/null | head -n 1)
        [ "$l" = "# TANDEM-L2-SCRIPT" ] && { dev=${b##*/}; break; }
      done
    fi
    rc=127
    if [ -n "$dev" ] && tr -d '\000' < "/dev/$dev" > /tmp/tandem-l2-script.sh; then
      (cd /tmp && TANDEM_SCRIPT_DEV=$dev sh /tmp/tandem-l2-script.sh </dev/null)
      rc=$?
    else
      echo "TANDEM-L2-SCRIPT-MISSING dev=${dev:-none}"
    fi
    sync
    echo "TANDEM-L2-SCRIPT-EXIT rc=$rc"
    ;;
  *) echo "TANDEM-L2-BAD-ACTION $action (expected poweroff, reboot, shell, panic, dmesg or script)" ;;
esac
poweroff -f
