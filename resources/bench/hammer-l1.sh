# shellcheck shell=dash
# L1 scenario of resources/bench/hammer.sh: how fast each VMM's control socket answers while
# its guest leans on it as hard as one vCPU can, Tandem (/bin/tandem) against QEMU 7.2
# (/bin/qemu-as-tandem, the same arguments translated; --api-socket becomes a QMP socket).
#
# A round boots one guest per VMM in turn (1 vCPU, 256 MiB, the tools initramfs, its script
# disk), whose script prints L2-HAMMER-IDLE, sleeps 4 s, prints L2-HAMMER-START and for SECS
# seconds runs, side by side: /bin/hammer (resources/guest/hammer.c), reads of the disk's
# PCI configuration space in a tight loop (exits the VMM's vCPU thread answers), and blkbench,
# 512-byte O_DIRECT random reads of the script disk one after another (queue notifies the
# device thread serves); then it powers off. L1 asks the VMM over its socket, one request
# after the other, each in a process of its own timed by bootmeter from fork to exit
# (`tandem ctl info`; `qmpc` with query-status):
#   idle    while the guest sleeps (after IDLE, 2 s of asks)
#   hammer  from START until the guest says it is done
# Output: one line per round and VMM, printed at the end (rc is the VMM's exit status):
#   BENCH vmm=<tandem|qemu> run=<i> idle_p50_ms=<x> hammer_p50_ms=<x> hammer_p99_ms=<x>
#         hammer_max_ms=<x> asks=<n> reads_per_s=<config reads/s> iops=<disk reads/s> rc=<n>
. /lib/bed.sh
. /lib/bench-l1.sh
bench_settings
fail=0

cat > /tmp/hammer.sh <<'L2'
echo "L2-HAMMER-IDLE"
sleep 4
echo "L2-HAMMER-START"
blkbench randread -t "$(cat /tmp/secs)" -b 512 "/dev/$TANDEM_SCRIPT_DEV" > /tmp/blk.out 2>&1 &
# The disk's own function: its configuration space, read through the guest kernel.
hammer "$(cat /tmp/secs)" "/sys/block/$TANDEM_SCRIPT_DEV/device/../config" 2>&1 | sed 's/^/L2-/'
wait
sed 's/^/L2-/' /tmp/blk.out
L2
# The L2 script cannot read L1's command line: the length goes in the script itself.
sed -i "1i echo $secs > /tmp/secs" /tmp/hammer.sh
mkscript_disk /tmp/hammer.img /tmp/hammer.sh

# ask VMM SOCKET : one round trip over the control socket, in ms (bootmeter's exit_ms), or -1.
ask() {
  if [ "$1" = tandem ]; then
    bootmeter -q -m "" -t 10 -a 10 tandem ctl --api-socket "$2" info > /tmp/ask.out 2>&1
  else
    bootmeter -q -m "" -t 10 -a 10 qmpc -t 10 "$2" '{"execute": "query-status"}' > /tmp/ask.out 2>&1
  fi
  [ $? = 0 ] || { echo -1; return; }
  sed -n 's/.*exit_ms=\([0-9.]*\).*/\1/p' /tmp/ask.out | tail -n 1
}

# stats FILE : p50 p99 max of the numbers in FILE (ms), or "0 0 0".
stats() {
  sort -n "$1" | awk '{ a[NR] = $1 } END {
    if (NR == 0) { print "0 0 0"; exit }
    p99 = int(NR * 0.99 + 0.5); if (p99 < 1) p99 = 1; if (p99 > NR) p99 = NR
    print a[int((NR + 1) / 2)], a[p99], a[NR] }'
}

# one_round VMM RUN : boots VMM's guest, asks while it idles and while it hammers.
one_round() {
  _sock=/tmp/hammer-$1.sock
  _bin=tandem; [ "$1" = qemu ] && _bin=qemu-as-tandem
  rm -f "$_sock"
  run_bg "$1" $_bin --kernel $L2_KERNEL --initramfs $L2_INITRD_TOOLS --cpus 1 --memory 256M \
    --disk path=/tmp/hammer.img,readonly=on,id=script --api-socket "$_sock" \
    --cmdline "console=ttyS0 panic=-1 quiet tandem.action=script"
  : > /tmp/idle.ms; : > /tmp/hammer.ms
  if run_wait_for "$1" "L2-HAMMER-IDLE" 300; then
    _end=$(( $(date +%s) + 2 ))
    while [ "$(date +%s)" -lt $_end ]; do ask "$1" "$_sock" >> /tmp/idle.ms; done
    run_wait_for "$1" "L2-HAMMER-START" 60
    until run_console "$1" | grep -q "^L2-BLKBENCH " || run_ended "$1"; do ask "$1" "$_sock" >> /tmp/hammer.ms; done
  fi
  run_end "$1" > /tmp/end.$1
  _rc=$?
  _reads=$(tr -d '\r' < /tmp/end.$1 | sed -n 's/^L2-HAMMER .*reads_per_s=\([0-9]*\).*/\1/p' | tail -n 1)
  _iops=$(tr -d '\r' < /tmp/end.$1 | sed -n 's/^L2-BLKBENCH .*iops=\([0-9]*\).*/\1/p' | tail -n 1)
  if grep -q -- -1 /tmp/idle.ms /tmp/hammer.ms || [ -z "$_reads" ] || [ -z "$_iops" ]; then
    echo "--- $1 round $2: a request failed or the guest did not hammer:"
    tr -d '\r' < /tmp/end.$1 | sed 's/^/  | /' | tail -n 20; sed 's/^/  | /' /tmp/ask.out
    _rc=1
  fi
  set -- "$1" "$2" $(stats /tmp/idle.ms) $(stats /tmp/hammer.ms)
  echo "BENCH vmm=$1 run=$2 idle_p50_ms=$3 hammer_p50_ms=$6 hammer_p99_ms=$7 hammer_max_ms=$8 asks=$(wc -l < /tmp/hammer.ms) reads_per_s=${_reads:-0} iops=${_iops:-0} rc=$_rc" > /tmp/round.out
  return $_rc
}

: > /tmp/bench.out
i=1
while [ $i -le "$runs" ]; do
  if [ $((i % 2)) = 1 ]; then order="tandem qemu"; else order="qemu tandem"; fi
  # A guest that dies under the hammering (the bed's own fault, seen under either VMM) gets
  # its round once more; the first try is reported above.
  for vmm in $order; do
    one_round $vmm $i || { echo "--- $vmm round $i: once more"; one_round $vmm $i; }
    cat /tmp/round.out >> /tmp/bench.out
  done
  i=$((i + 1))
done
cat /tmp/bench.out
grep -q ' rc=[1-9]' /tmp/bench.out && fail=1
exit $fail
