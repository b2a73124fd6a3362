#!/bin/busybox sh
# shellcheck shell=dash
# /init of L1, the Linux test host that L0's QEMU runs under TCG and in which the VMM under
# test (Tandem, or QEMU 7.2 for comparison) boots L2 with KVM.
#
# Lines for the harness:
#   INSMOD-FAIL <module>          a module of the base image did not load
#   L1-INIT-OK nproc=<n> mem_kb=<MemTotal>
#   L1-NO-SCENARIO                no /scenario.sh (it comes from the overlay archive)
#   L1-SCENARIO-EXIT rc=<rc>      /scenario.sh ran and exited with rc
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

ip link set lo up
mem=0
while read -r key val _; do
  [ "$key" = MemTotal: ] && { mem=$val; break; }
done < /proc/meminfo
echo "L1-INIT-OK nproc=$(nproc) mem_kb=$mem"

if [ -f /scenario.sh ]; then
  cd /root || true
  sh /scenario.sh
  echo "L1-SCENARIO-EXIT rc=$?"
else
  echo "L1-NO-SCENARIO"
fi
sync
poweroff -f
