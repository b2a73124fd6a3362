# shellcheck shell=dash
# L1 scenario: the issue-3 tooling end to end, with whatever /bin/tandem is. Until Tandem has
# --net/--disk, run it with the QEMU test double in its place:
#   resources/bed/overlay.sh /tmp/ov.cpio resources/bench/qemu-as-tandem.sh \
#     resources/bed/scenarios/virtio-smoke.sh:/scenario.sh
#   resources/bed/run-l1.sh /tmp/ov.cpio /tmp/l1.log
# One L2 boot (tools initramfs, 1 vCPU, 512 MiB) with a virtio-net NIC on a tap L1 made
# (10.77.0.1/24 in L1, 10.77.0.2 in L2), a data disk (id=data, 64 MiB), a readonly disk
# (id=ro, 8 MiB) and the script disk. It checks, printing SMOKE <check> ok|FAIL lines:
#   PCI/MSI-X/ACPI as the guest sees them; pings both ways; 64 MiB over TCP each way
#   (sha256 compared); the disk pattern L1 wrote read in L2, the one L2 wrote read in L1;
#   a write to the readonly disk refused; iperf3 both ways; blkbench randread and seqread.
. /lib/bed.sh
RUN_TIMEOUT=600
fails=0
check() {  # check NAME CONDITION-RESULT(0/1)
  if [ "$2" = 0 ]; then echo "SMOKE $1 ok"; else echo "SMOKE $1 FAIL"; fails=$((fails + 1)); fi
}

tap_up tapt 10.77.0.1/24 || exit 1
iperf3_server 10.77.0.1
mkdisk /tmp/data.img 64M
blkbench pattern write /tmp/data.img 1M 1M 11 >/dev/null
mkdisk /tmp/ro.img 8M 33
want_up=$(blkbench gen 5 64M | sha256sum | cut -d' ' -f1)     # cross-checks blkbench sum
want_down=$(blkbench gen 6 64M | sha256sum | cut -d' ' -f1)
# Guest -> L1 transfer lands here.
tcp_recv 5001 5 > /tmp/up.out &

mkscript_disk /tmp/script.img - <<'EOF'
l2_pci_report
l2_blk_report
l2_net_report
dmesg | grep -E 'MMCONFIG|ACPI: PCI Root|PCI: Using' | sed 's/^/L2-KLOG /'
l2_net_up 10.77.0.2/24
ping -c 3 -W 5 10.77.0.1 >/dev/null; echo "L2-PING rc=$?"
# L1 -> guest (L1 sends once it sees L2-NET-UP), then guest -> L1.
tcp_recv 5002 6
tcp_send 10.77.0.1 5001 5 64M
d=$(l2_disk_by_serial data) r=$(l2_disk_by_serial ro)
echo "L2-DISKS data=$d ro=$r"
blkbench pattern verify /dev/$d 1M 1M 11
blkbench pattern write /dev/$d 4M 1M 22
blkbench pattern verify /dev/$r 0 1M 33
blkbench pattern write /dev/$r 2M 4K 44; echo "L2-RO-WRITE rc=$?"
iperf3 -c 10.77.0.1 -t 3 -i 0 -f m | grep -E 'sender|receiver' | sed 's/^/L2-IPERF-TX /'
iperf3 -c 10.77.0.1 -t 3 -i 0 -f m -R | grep -E 'sender|receiver' | sed 's/^/L2-IPERF-RX /'
blkbench randread -t 3 /dev/$d
blkbench seqread -t 3 /dev/$d
EOF

run_bg smoke tandem --kernel $L2_KERNEL --initramfs $L2_INITRD_TOOLS --cpus 1 --memory 512M \
  --cmdline "$L2_SCRIPT_CMDLINE" --net tap=tapt,mac=52:54:00:77:00:02 \
  --disk path=/tmp/data.img,id=data --disk path=/tmp/ro.img,readonly=on,id=ro \
  --disk path=/tmp/script.img,readonly=on,id=script
if run_wait_for smoke 'L2-NET-UP' 300; then
  ping -c 3 -W 5 10.77.0.2 >/dev/null; check ping-l1-to-l2 $?
  tcp_send 10.77.0.2 5002 6 64M
fi
run_end smoke > /tmp/smoke.out
rc=$?
cat /tmp/smoke.out
out=$(tr -d '\r' < /tmp/smoke.out)
check vmm-exit "$rc"
echo "$out" | grep -q 'TANDEM-L2-SCRIPT-EXIT rc=0'; check script-exit $?
echo "$out" | grep -q 'L2-PING rc=0'; check ping-l2-to-l1 $?
echo "$out" | grep -q "TCP-RECV port=5002 bytes=67108864 sha256=$want_down seed=6 pattern=ok"
check tcp-64m-l1-to-l2 $?
wait
cat /tmp/up.out
grep -q "TCP-RECV port=5001 bytes=67108864 sha256=$want_up seed=5 pattern=ok" /tmp/up.out
check tcp-64m-l2-to-l1 $?
echo "$out" | grep -q 'mode=pattern-verify result=ok off=1048576 len=1048576 seed=11'; check l1-write-l2-read $?
blkbench pattern verify /tmp/data.img 4M 1M 22; check l2-write-l1-read $?
echo "$out" | grep -q 'mode=pattern-verify result=ok off=0 len=1048576 seed=33'; check ro-read $?
echo "$out" | grep -q 'mode=pattern-write result=error'; check ro-write-refused $?
echo "$out" | grep -qE 'L2-PCI .*virtio=virtio_net .*msix=on'; check pci-net-msix $?
echo "$out" | grep -qE 'L2-PCI .*virtio=virtio_blk .*msix=on'; check pci-blk-msix $?
echo "$out" | grep -q 'L2-KLOG .*MMCONFIG'; check acpi-mmconfig $?
echo "$out" | grep -qE 'L2-IPERF-TX .* Mbits/sec .*receiver'; check iperf-tx $?
echo "$out" | grep -qE 'L2-IPERF-RX .* Mbits/sec .*receiver'; check iperf-rx $?
echo "$out" | grep -q 'BLKBENCH mode=randread .*iops='; check blk-randread $?
echo "$out" | grep -q 'BLKBENCH mode=seqread .*mbps='; check blk-seqread $?
iperf3_server_stop
tap_down tapt
echo "SMOKE-DONE fails=$fails"
[ $fails = 0 ]
