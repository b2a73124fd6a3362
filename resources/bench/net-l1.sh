# shellcheck shell=dash
# L1 scenario of resources/bench/net.sh: TCP throughput between L1 and an L2 guest over a
# virtio-net NIC on a tap, Tandem (/bin/tandem) against QEMU 7.2 (/bin/qemu-as-tandem, the
# same arguments translated; see resources/bench/qemu-as-tandem.sh).
#
# Both guests run at the same time, each on its own tap, and L1 measures them in turn, a few
# seconds apart: the nested bed's throughput drifts by up to 2x over tens of seconds (TCG, the
# host's other load), which would swamp a comparison of runs made a minute apart. The guest
# not being measured is idle.
#   Tandem's guest: tap "tapt", L1 10.77.0.1/24, guest 10.77.0.2
#   QEMU's guest:   tap "tapq", L1 10.78.0.1/24, guest 10.78.0.2
#   each: 1 vCPU, 512 MiB, the tools initramfs; its script brings eth0 up and serves L1's
#   l2_exec (resources/guest/script-lib.sh). An iperf3 server on each L1 tap address.
# A measurement: l2_exec runs in the guest `iperf3 -c <L1> -t SECS -O 1` (tx: guest -> L1)
# or the same with -R (rx: L1 -> guest); the value is the receiver's Mbit/s. After an
# uncounted warm-up (2 s each way, each guest), RUNS rounds; in each, tx then rx, each
# measured for both VMMs, the VMM going first alternating from round to round.
# Output: one line per round and VMM, printed at the end (rc is the VMM's exit status):
#   BENCH vmm=<tandem|qemu> run=<i> tx_mbps=<x> rx_mbps=<x> rc=<n>
# Settings from L1's command line: see resources/bench/l1-lib.sh.
. /lib/bed.sh
. /lib/bench-l1.sh
bench_settings
fail=0

for vmm in tandem qemu; do
  n=$(addr $vmm)
  tap=tapt; [ $vmm = qemu ] && tap=tapq
  tap_up $tap "$n.1/24" || exit 1
  iperf3_server "$n.1" || exit 1
  printf 'l2_net_up %s.2/24 >/dev/null || exit 1\nl2_serve\n' "$n" | mkscript_disk "/tmp/script-$vmm.img" -
done
ARGS="--kernel $L2_KERNEL --initramfs $L2_INITRD_TOOLS --cpus 1 --memory 512M"
CMD="console=ttyS0 panic=-1 quiet tandem.action=script"
run_bg tandem tandem $ARGS --cmdline "$CMD" --net tap=tapt,mac=52:54:00:77:00:02 \
  --disk path=/tmp/script-tandem.img,readonly=on,id=script
run_bg qemu qemu-as-tandem $ARGS --cmdline "$CMD" --net tap=tapq,mac=52:54:00:78:00:02 \
  --disk path=/tmp/script-qemu.img,readonly=on,id=script
for vmm in tandem qemu; do
  l2_wait_serve "$(addr $vmm).2" 300 || { echo "--- $vmm: its guest agent never answered"; fail=1; }
done

# measure VMM tx|rx : the receiver's Mbit/s, or 0.
measure() {
  _n=$(addr "$1")
  _r=""; [ "$2" = rx ] && _r=-R
  l2_exec "$_n.2" iperf3 -c "$_n.1" -t "$secs" -O 1 -i 0 -f m $_r > /tmp/iperf.out
  _m=$(awk '/receiver/ { for (i = 1; i < NF; i++) if ($(i + 1) == "Mbits/sec") print $i }' /tmp/iperf.out)
  if [ -z "$_m" ]; then
    echo "--- $1 $2: iperf3 said:" >&2; sed 's/^/  | /' /tmp/iperf.out >&2
    _m=0
  fi
  echo "$_m"
}

if [ $fail = 0 ]; then
  for vmm in tandem qemu; do   # warm-up, not counted
    l2_exec "$(addr $vmm).2" "iperf3 -c $(addr $vmm).1 -t 2 -i 0 >/dev/null; iperf3 -c $(addr $vmm).1 -t 2 -i 0 -R >/dev/null"
  done
  bench_rounds tx=tx_mbps rx=rx_mbps
fi
bench_end || fail=1
iperf3_server_stop
tap_down tapt
tap_down tapq
exit $fail
