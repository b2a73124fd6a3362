# L1 scenario for tests/bed_virtio.rs: one guest with a two-queue virtio-net NIC on a tap
# L1 made (with an address) and virtio-blk disks; the guest runs a script from a script disk.
. /lib/bed.sh
MIB=1048576

tap_up tnet0 10.77.0.1/24 multi_queue
mkdisk /tmp/data.img 64M              # zeros: the guest writes a pattern, L1 checks it
mkdisk /tmp/fromhost.img 16M 5        # L1's pattern (seed 5): the guest checks it
mkdisk /tmp/ro.img 16M 9              # readonly=on: the guest's writes must fail
# direct=on: L1's /tmp is tmpfs, which refuses O_DIRECT; a loop device over a file takes it.
mkdisk /tmp/direct.img 16M
DIRECT_DEV=$(losetup -f) && losetup "$DIRECT_DEV" /tmp/direct.img || echo "L1-LOSETUP-FAILED"

cat > /tmp/l2.sh <<'L2'
dmesg | grep -E 'MMCONFIG|not using|PCI: Fatal|ACPI: PCI Root' | sed 's/^/L2-KMSG /'
l2_pci_report
l2_blk_report
l2_net_up 10.77.0.2/24
l2_net_report
ping -c 3 -W 3 10.77.0.1 >/dev/null && echo L2-PING-OK
# Disks, found by the serial (the --disk id).
D=$(l2_disk_by_serial data); H=$(l2_disk_by_serial fromhost); R=$(l2_disk_by_serial ro)
blkbench pattern write /dev/$D 0 33554432 3 && sync && echo "L2-DATA-WRITTEN dev=$D"
blkbench pattern verify /dev/$H 0 16777216 5
blkbench pattern write /dev/$R 0 1048576 1 >/dev/null 2>&1; echo "L2-RO-WRITE rc=$?"
X=$(l2_disk_by_serial direct)
blkbench pattern write /dev/$X 0 8388608 13 && sync && echo "L2-DIRECT-WRITTEN dev=$X"
# 64 MiB each way over TCP, checked against the generator on the other side.
tcp_send 10.77.0.1 5001 7 67108864
tcp_recv 5002 11
L2
mkscript_disk /tmp/script.img /tmp/l2.sh

tcp_recv 5001 7 > /tmp/l1-recv.log 2>&1 &
RECV=$!
run_bg virtio $TANDEM --kernel $L2_KERNEL --initramfs $L2_INITRD_TOOLS --memory 512M --cpus 2 \
  --net tap=tnet0,mac=02:00:00:00:77:02,id=nic0,queues=2 \
  --disk path=/tmp/data.img,id=data --disk path=/tmp/fromhost.img,id=fromhost \
  --disk path=/tmp/ro.img,readonly=on,id=ro --disk path=/tmp/script.img,readonly=on,id=script \
  --disk "path=$DIRECT_DEV,direct=on,id=direct" \
  --cmdline "$L2_SCRIPT_CMDLINE"
# The guest listens once it has sent its 64 MiB; tcp_send retries until it does.
run_wait_for virtio "TCP-SENT" 400 && tcp_send 10.77.0.2 5002 11 67108864
# The flags tandem opened the loop device with (O_DIRECT is octal 040000).
for fd in /proc/$(cat /tmp/run-virtio.pid)/fd/*; do
  [ "$(readlink "$fd")" = "$DIRECT_DEV" ] && echo "L1-DIRECT-FD flags=$(awk '/^flags:/ { print $2 }' "/proc/$(cat /tmp/run-virtio.pid)/fdinfo/${fd##*/}")"
done
run_end virtio
# A guest that died before sending leaves the receiver listening: it would wait forever.
kill $RECV 2>/dev/null && echo "L1-RECV-ABANDONED"
wait
sed 's/^/L1-/' /tmp/l1-recv.log
blkbench pattern verify /tmp/data.img 0 33554432 3 | sed 's/^/L1-DATA /'
blkbench pattern verify /tmp/ro.img 0 16777216 9 | sed 's/^/L1-RO /'
losetup -d "$DIRECT_DEV"
blkbench pattern verify /tmp/direct.img 0 8388608 13 | sed 's/^/L1-DIRECT /'
tap_down tnet0
