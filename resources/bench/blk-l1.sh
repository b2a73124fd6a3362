# shellcheck shell=dash
# L1 scenario of resources/bench/blk.sh: virtio-blk read performance, Tandem (/bin/tandem)
# against QEMU 7.2 (/bin/qemu-as-tandem, the same arguments translated; see
# resources/bench/qemu-as-tandem.sh).
#
# Both guests run at the same time and L1 measures them in turn, a few seconds apart (the
# nested bed's speed drifts over tens of seconds; see net-l1.sh). The guest not being
# measured is idle.
#   /tmp/blk.img: 256 MiB raw, filled with blkbench's pattern (no holes: every read copies
#   real pages), on L1's tmpfs, given to both guests as a readonly virtio-blk disk.
#   Each guest: 1 vCPU, 512 MiB, the tools initramfs, a virtio-net NIC only for L1 to drive
#   it (Tandem's: tap "tapt", guest 10.77.0.2; QEMU's: "tapq", 10.78.0.2); its script links
#   the data disk to /dev/bench and serves L1's l2_exec (resources/guest/script-lib.sh).
# Measurements, run in the guest with l2_exec (blkbench: O_DIRECT, one request in flight):
#   blkbench randread -t SECS /dev/bench   4 KiB at random offsets: IOPS
#   blkbench seqread -t SECS /dev/bench    1 MiB sequential: MB/s (10^6 bytes)
# After an uncounted 1 s warm-up of each, RUNS rounds; in each, randread then seqread, each
# measured for both VMMs, the VMM going first alternating from round to round.
# Output: one line per round and VMM, printed at the end (rc is the VMM's exit status):
#   BENCH vmm=<tandem|qemu> run=<i> randread_iops=<n> seq_mbps=<x> rc=<n>
# Settings from L1's command line: see resources/bench/l1-lib.sh.
. /lib/bed.sh
. /lib/bench-l1.sh
bench_settings
fail=0
mkdisk /tmp/blk.img 256M 1 || exit 1

for vmm in tandem qemu; do
  n=$(addr $vmm)
  tap=tapt; [ $vmm = qemu ] && tap=tapq
  tap_up $tap "$n.1/24" || exit 1
  mkscript_disk "/tmp/script-$vmm.img" - <<EOF
d=\$(l2_data_disks | head -n 1)
[ -n "\$d" ] || { echo "no data disk"; l2_blk_report; exit 1; }
ln -s "/dev/\$d" /dev/bench
l2_net_up $n.2/24 >/dev/null || exit 1
l2_serve
EOF
done
ARGS="--kernel $L2_KERNEL --initramfs $L2_INITRD_TOOLS --cpus 1 --memory 512M"
CMD="console=ttyS0 panic=-1 quiet tandem.action=script"
run_bg tandem tandem $ARGS --cmdline "$CMD" --net tap=tapt,mac=52:54:00:77:00:02 \
  --disk path=/tmp/blk.img,readonly=on,id=data --disk path=/tmp/script-tandem.img,readonly=on,id=script
run_bg qemu qemu-as-tandem $ARGS --cmdline "$CMD" --net tap=tapq,mac=52:54:00:78:00:02 \
  --disk path=/tmp/blk.img,readonly=on,id=data --disk path=/tmp/script-qemu.img,readonly=on,id=script
for vmm in tandem qemu; do
  l2_wait_serve "$(addr $vmm).2" 300 || { echo "--- $vmm: its guest agent never answered"; fail=1; }
done

# measure VMM randread|seqread : IOPS (randread) or MB/s (seqread), or 0.
measure() {
  l2_exec "$(addr "$1").2" blkbench "$2" -t "$secs" /dev/bench > /tmp/blk.out
  _k=mbps; [ "$2" = randread ] && _k=iops
  _v=$(kv $_k "$(grep "BLKBENCH mode=$2 " /tmp/blk.out)") || {
    echo "--- $1 $2: blkbench said:" >&2; sed 's/^/  | /' /tmp/blk.out >&2
    _v=0
  }
  echo "$_v"
}

if [ $fail = 0 ]; then
  for vmm in tandem qemu; do   # warm-up, not counted
    l2_exec "$(addr $vmm).2" "blkbench randread -t 1 /dev/bench >/dev/null; blkbench seqread -t 1 /dev/bench >/dev/null"
  done
  bench_rounds randread=randread_iops seqread=seq_mbps
fi
bench_end || fail=1
tap_down tapt
tap_down tapq
exit $fail
