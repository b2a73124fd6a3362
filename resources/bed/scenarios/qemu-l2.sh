# shellcheck shell=dash
# L1 scenario: boot L2 (the same kernel and initramfs Tandem boots) with Debian 12's QEMU 7.2
# under KVM, timed by bootmeter. The reference run that shows the images and the bed work
# independently of Tandem. Settings from L1's kernel command line (run-l1.sh --append):
#   tandem.l2_mem=<QEMU -m value, default 512>  tandem.l2_cpus=<n, default 1>
#   tandem.l2_machine=<QEMU -M value, default microvm,rtc=on>  tandem.l2_append=<extra, ',' for ' '>
# Prints L2's console, then "L2-VMM-EXIT rc=<rc>" and bootmeter's BOOTMETER line.
mem=512 cpus=1 machine=microvm,rtc=on extra=""
for a in $(cat /proc/cmdline); do
  case $a in
    tandem.l2_mem=*)     mem=${a#*=} ;;
    tandem.l2_cpus=*)    cpus=${a#*=} ;;
    tandem.l2_machine=*) machine=${a#*=} ;;
    tandem.l2_append=*)  extra=$(echo "${a#*=}" | tr , ' ') ;;
  esac
done
[ -c /dev/kvm ] || { echo "L1: no /dev/kvm (kvm_amd not loaded?)"; exit 1; }
bootmeter -m TANDEM-L2-INIT -t 600 -a 60 \
  qemu-system-x86_64 -M "$machine" -accel kvm -cpu host -m "$mem" -smp "$cpus" \
  -nodefaults -no-user-config -no-reboot -display none -serial stdio \
  -kernel /l2/vmlinuz -initrd /l2/initrd.gz -append "console=ttyS0 panic=-1 $extra" </dev/null
rc=$?
echo "L2-VMM-EXIT rc=$rc"
exit $rc
