#!/bin/bash
# shellcheck disable=SC2054  # QEMU options are comma lists
# run-l1.sh [--mem MiB] [--smp N] [--iommu] [--igb] [--timeout SEC] [--append STR] OVERLAY.cpio LOG
#
# Boots L1 — Debian's kernel with the base initramfs (resources/bed/build-l1.sh) plus
# OVERLAY.cpio (resources/bed/overlay.sh; "-" for none) — under L0's QEMU 11 with TCG, and
# writes L1's serial console, and nothing else, to LOG (lines end in \r\n). QEMU's own
# messages go to stderr.
#
# Why TCG: this host's /dev/kvm is PVM-based and cannot run a stock Linux kernel. TCG with
# `-cpu max` emulates AMD SVM with nested paging, so kvm_amd works inside L1 and the VMM under
# test gets a real /dev/kvm there. `kernel-irqchip=split` is what the emulated Intel IOMMU's
# interrupt remapping needs (--iommu).
#
#   --mem MiB      L1's RAM (default 2048). Give L1 ~2 GiB more than the L2 guest's memory.
#   --smp N        L1's vCPUs (default 2; MTTCG runs one host thread per vCPU)
#   --iommu        an emulated Intel IOMMU with interrupt remapping (vfio-pci in L1 needs it);
#                  adds intel_iommu=on iommu=pt to L1's command line
#   --igb          an igb NIC (SR-IOV capable, up to 7 VFs) on a PCIe root port, its backend a
#                  tap (tap0, 10.98.0.1/24) in a network namespace made here and removed on
#                  every exit (no traffic leaves that namespace), two e1000e functions
#                  that share an IOMMU group, and an "edu" test device (see below)
#   --timeout SEC  kill L0's QEMU after SEC seconds (default 900; exit status then 124)
#   --append STR   more L1 kernel command line (tandem.l1_verbose=1 keeps L1's kernel
#                  messages on the console after module loading)
# Environment (optional):
#   L1_NETNS_CMD   with --igb: a shell command (sh -c) run in the background inside that
#                  network namespace while L1 runs, with L1_LOG (LOG) and L1_NETNS (the
#                  namespace) in its environment: e.g. an L0-side peer of L1's or L2's
#                  network (resources/bench/failover.sh runs its pinger so). Make it `exec`
#                  its program: once L1's QEMU has exited (and on every other exit of this
#                  script) it gets SIGTERM, by its pid, and is waited for (SIGKILL after
#                  5 s), before the namespace goes. Its exit status is not ours.
# Exit status: QEMU's (0 when L1 powered off; 1 when L1's kernel panicked, via pvpanic, or
# crashed and hung, see below).
# A one-line summary goes to stderr. Root is needed only for --igb.
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"

usage="usage: run-l1.sh [--mem MiB] [--smp N] [--iommu] [--igb] [--timeout SEC] [--append STR] OVERLAY.cpio LOG"
MEM=2048 SMP=2 IOMMU=0 IGB=0 TMO=900 APPEND=""
while [ $# -gt 0 ]; do
  case $1 in
    --mem)     MEM=${2:?$usage}; shift 2 ;;
    --smp)     SMP=${2:?$usage}; shift 2 ;;
    --iommu)   IOMMU=1; shift ;;
    --igb)     IGB=1; shift ;;
    --timeout) TMO=${2:?$usage}; shift 2 ;;
    --append)  APPEND=${2?$usage}; shift 2 ;;
    -h|--help) echo "$usage"; exit 0 ;;
    --*)       die "unknown option '$1'; $usage" ;;
    *)         break ;;
  esac
done
[ $# -eq 2 ] || die "$usage"
OVERLAY=$1 LOG=$2
[ -z "${L1_NETNS_CMD:-}" ] || [ $IGB = 1 ] || die "L1_NETNS_CMD needs --igb (it runs in --igb's network namespace)"
case "$MEM$SMP$TMO" in *[!0-9]*) die "--mem, --smp and --timeout take whole numbers" ;; esac

QEMU=$CACHE/qemu/qemu KERNEL=$CACHE/vmlinux-l1 BASE=$CACHE/l1-base.cpio.gz
[ -x "$QEMU" ] || die "no L0 QEMU at $QEMU: run resources/build-images.sh (or resources/fetch-qemu.sh)"
[ -f "$KERNEL" ] || die "no L1 kernel at $KERNEL: run resources/build-images.sh (or resources/fetch-guest.sh)"
[ -f "$BASE" ] || die "no L1 initramfs at $BASE: run resources/build-images.sh"
[ "$OVERLAY" = - ] || [ -f "$OVERLAY" ] || die "overlay '$OVERLAY' not found (make one with resources/bed/overlay.sh)"
need_cmd timeout
mkdir -p "$(dirname "$LOG")"
# QEMU's file: chardev does not truncate: a longer log from an earlier run would keep its tail.
rm -f "$LOG"

# Base + overlay in one file. The kernel looks for each following archive at a 4-byte
# aligned offset, so the gzip'ed base is padded with zero bytes (which it skips).
INITRD=$(mktemp "${TMPDIR:-/tmp}/tandem-l1-initrd.XXXXXX")
NS="" HOOK=""
stop_hook() {
  [ -n "$HOOK" ] || return 0
  local n=0
  kill -TERM "$HOOK" 2>/dev/null || true
  while kill -0 "$HOOK" 2>/dev/null && [ $n -lt 10 ]; do
    sleep 0.5; n=$((n + 1))
  done
  kill -KILL "$HOOK" 2>/dev/null || true
  wait "$HOOK" 2>/dev/null || true
  HOOK=""
}
cleanup() {
  rm -f "$INITRD"
  stop_hook
  if [ -n "$NS" ]; then ip netns del "$NS" 2>/dev/null || true; fi
}
trap cleanup EXIT
{
  cat "$BASE"
  pad=$(( (4 - $(stat -c %s "$BASE") % 4) % 4 ))
  head -c "$pad" /dev/zero
  [ "$OVERLAY" = - ] || cat "$OVERLAY"
} > "$INITRD"

# audit=1: with no audit daemon the kernel prints its audit records, among them the
# seccomp ones (type=1326) that init.sh reports as L1-SECCOMP lines; a larger audit queue
# and kernel log keep them all through a burst (--seccomp log).
# oops=panic: an L1 kernel Oops ends the run at once (pvpanic, below) instead of leaving a
# half-dead L1 to the timeout.
CMDLINE="console=ttyS0 panic=-1 oops=panic audit=1 audit_backlog_limit=8192 log_buf_len=4M"
# -nodefaults: no default NIC (QEMU's user-mode network would reach outside), VGA, etc.
# pvpanic + panic=exit-failure: an L1 kernel panic ends QEMU with status 1, not 0.
ARGS=(-accel tcg -M q35,kernel-irqchip=split -cpu max -smp "$SMP" -m "$MEM"
      -nodefaults -no-user-config -display none -monitor none -no-reboot
      -serial "file:$LOG" -device pvpanic -action panic=exit-failure
      -kernel "$KERNEL" -initrd "$INITRD")
if [ $IOMMU = 1 ]; then
  ARGS+=(-device intel-iommu,intremap=on,caching-mode=on)
  CMDLINE="$CMDLINE intel_iommu=on iommu=pt"
fi
RUN=()
if [ $IGB = 1 ]; then
  need_root "--igb (it makes a network namespace and a tap device)"
  need_cmd ip
  NS=tandem-l1-$$
  ip netns add "$NS" || { NS=""; die "could not create network namespace tandem-l1-$$"; }
  ip -n "$NS" link set lo up
  ip -n "$NS" tuntap add dev tap0 mode tap
  ip -n "$NS" addr add 10.98.0.1/24 dev tap0
  ip -n "$NS" link set tap0 up
  # Not QEMU's default MACs: L2 guests may use that one, and a bridge in L1 would then drop
  # their frames as its own. Behind a second root port, two e1000e functions of one slot
  # (no backends): they lack ACS (and, unlike the igb, Linux has no quirk calling them
  # isolated), so they share an IOMMU group and L1's e1000e driver binds both: a device
  # whose group holds another device bound to a host driver, for the refusal tests. Behind
  # a third, QEMU's "edu" test device: a function with INTx (VFs have none), whose
  # interrupt a guest can raise with one register write.
  ARGS+=(-device pcie-root-port,id=rp1,chassis=1,slot=1
         -netdev tap,id=n0,ifname=tap0,script=no,downscript=no
         -device igb,netdev=n0,bus=rp1,romfile=,mac=52:54:00:7a:4d:01
         -device pcie-root-port,id=rp2,chassis=2,slot=2
         -device e1000e,bus=rp2,addr=0.0,multifunction=on,romfile=,mac=52:54:00:7a:4d:02
         -device e1000e,bus=rp2,addr=0.1,romfile=,mac=52:54:00:7a:4d:03
         -device pcie-root-port,id=rp3,chassis=3,slot=3
         -device edu,bus=rp3)
  RUN=(ip netns exec "$NS")
fi
[ -z "$APPEND" ] || CMDLINE="$CMDLINE $APPEND"

SECONDS=0
start=$(date +%s.%N)
# In the background so that a signal to this script stops QEMU too (timeout(1) puts itself
# in its own process group, so a signal to ours would not reach it).
"${RUN[@]}" timeout -k 10 "$TMO" "$QEMU" "${ARGS[@]}" -append "$CMDLINE" &
qpid=$!
if [ -n "${L1_NETNS_CMD:-}" ]; then
  L1_LOG=$LOG L1_NETNS=$NS ip netns exec "$NS" sh -c "$L1_NETNS_CMD" </dev/null &
  HOOK=$!
fi
# An L1 kernel that crashes in its exception entry can hang printing its Oops, before the
# panic that oops=panic asks for, and an L1 CPU can stay inside VMRUN for good (RCU then
# reports it stalled every minute, and nothing in L1 gets it out): the crash's first line
# and 20 s of no panic, or a second stall report, ends QEMU here, and this script exits 1
# as for a panic.
( while kill -0 $qpid 2>/dev/null; do
    sleep 2
    if grep -aq 'BUG: TASK stack guard page was hit' "$LOG" 2>/dev/null; then
      sleep 20
    elif [ "$(grep -ac 'rcu_preempt detected stalls' "$LOG" 2>/dev/null)" -lt 2 ]; then
      continue
    fi
    kill -0 $qpid 2>/dev/null && : > "$LOG.crashed" && kill -TERM $qpid
    break
  done ) &
WATCH=$!
# QEMU exits 0 when terminated by a signal: remember that we were stopped.
stopped=""
for sig in INT TERM HUP; do
  # shellcheck disable=SC2064  # $sig now, $qpid when the trap runs
  trap "stopped=$sig; kill -TERM \$qpid 2>/dev/null || true" $sig
done
while :; do
  rc=0; wait $qpid || rc=$?
  kill -0 $qpid 2>/dev/null || break
done
if [ -n "$stopped" ]; then
  rc=$((128 + $(kill -l "$stopped")))
fi
kill $WATCH 2>/dev/null || true
crashed=0
if [ -e "$LOG.crashed" ]; then crashed=1; rc=1; rm -f "$LOG.crashed"; fi
stop_hook
wall=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN{printf "%.1f", e - s}')
note=""
case $rc in
  0) ;;
  124|137) note=" (timed out after ${TMO}s)" ;;
  1) grep -q 'Kernel panic' "$LOG" 2>/dev/null && note=" (L1 kernel panic)" ;;
esac
[ $crashed = 0 ] || note=" (L1 kernel crashed or stalled: ended)"
[ -z "$stopped" ] || note=" (stopped by SIG$stopped)"
scen=$(grep -ao 'L1-SCENARIO-EXIT rc=[0-9]*' "$LOG" 2>/dev/null | tail -n1 | tr -d '\r' || true)
say "qemu_rc=$rc wall=${wall}s ${scen:-no scenario exit seen} log=$LOG$note"
exit $rc
