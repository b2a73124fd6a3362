#!/bin/bash
# bench/failover.sh [--runs N] [--secs S] — the failover outage of a VF paired with a
# virtio-net standby, Tandem against QEMU 7.2 (a benchmark, not a test).
#
# Inside ONE L1 of the nested bed (run-l1.sh --iommu --igb; resources/bench/failover-l1.sh)
# one guest at a time (1 vCPU, 512 MiB, the lean L2 initramfs, `quiet`) gets an igb VF as
# the primary and a virtio-net standby on a tap, one MAC for both; its net_failover master
# has 10.98.0.3. L1's bridge joins the PF and the tap. Tandem: --net ...,standby=on,mac= and
# --vf ...,create=on,failover=; unplug `tandem ctl device-remove vf0`, re-plug `tandem ctl
# device-add vf0` (Tandem moves the VF's MAC and br0's entry for the guest itself). QEMU
# (-M q35 -accel kvm -cpu host, virtio-net-pci,failover=on on a tap with vhost=off,
# vfio-pci,failover_pair_id on a PCIe root port): unplug = QMP device_del, DEVICE_DELETED,
# clear the VF's MAC on the PF and flush what br0 learnt on the PF (QEMU's best case: see
# FAILOVER_QEMU_FDB below); re-plug = restore the MAC, device_add. Each
# round runs one scenario per VMM, the VMM going first alternating; in a scenario the guest
# runs 5 s on the VF, S + 1 s (--secs, default 5) on the standby after the unplug, and 5 s after
# the VF is back.
#
# How: L0 (this host), from the bed's network namespace (10.98.0.1 on tap0, the igb's
# backend), pings the guest every 10 ms with a raw-socket pinger (resources/bed/pingmon.c,
# run by run-l1.sh's L1_NETNS_CMD hook). One clock: the pinger's (L0's CLOCK_MONOTONIC).
# L1 prints its events on its console (FOEV: unplug/re-plug command issued, returned, ...)
# and relays the guest's (FOG: VF gone, VF back, VF carrying traffic); the pinger
# time-stamps every console line as it reads it (within ~2 ms of L0's QEMU writing it;
# a guest line also waits for the guest's serial port, a few tens of ms under nesting).
# Per scenario, U = the unplug command issued, P = the re-plug command issued, E = the end:
#   outage_ms         the longest interval between consecutive replies (in request order)
#                     from the last reply to a request sent before U to the first reply to
#                     one sent at or after P: the last reply before the gap -> the first
#                     reply after it (a gap still open at E counts up to E)
#   lost              requests sent in [U, P) that got no reply
#   return_ms         P -> the guest sees its VF's rx_packets and tx_packets both risen by 2
#                     since the VF came back (L0's requests and its replies go over the VF
#                     again; the guest polls its counters every ~20 ms): FOG vf-rx - P
#   replug_outage_ms  as outage_ms, from the last reply to a request sent before P until E
#                     (an outage that began before P and ends after it counts in both)
#   replug_lost       requests sent in [P, E) that got no reply
#   also: unplug_cmd_ms (U -> the unplug returned; QEMU: DEVICE_DELETED and the MAC cleared),
#   eject_ms (U -> the guest's VF netdev gone), replug_cmd_ms (P -> the re-plug returned),
#   replies_before (replies in the 3 s before U: the path worked).
#   tcp               the slow TCP stream L0 sends the guest along with the pings (pingmon -p:
#                     512 bytes a ping, from "PINGMON on" to "PINGMON off", across both
#                     transitions): ok (every byte arrived, both sides closed cleanly),
#                     reset (the stream was reset: ECONNRESET/EPIPE), or what went wrong
#                     (err=<errno>, short=<guest bytes>/<sent>, none: no record)
# Under TCG every figure is slow in absolute terms; both VMMs get the same bed and guest.
# Output: per round and VMM
#   BENCH vmm=<tandem|qemu> run=<i> outage_ms= lost= return_ms= replug_outage_ms= replug_lost= ... rc=<0 ok>
# then the medians over the rounds (and the TCP streams reset, summed), the last line being
#   outage_ms=<tandem> qemu_outage_ms=<qemu> lost=<tandem> qemu_lost=<qemu> return_ms=<tandem>
# (the line before it: qemu_return_ms, and both VMMs' replug_outage_ms, replug_lost, unplug_cmd_ms,
# tcp_resets).
# Dies (after the BENCH lines) unless every round measured every VMM it ran. A guest that
# never got ready (it hung in the bed before anything was measured) is booted once more,
# as run=<round>.2; the failed attempt keeps its rc=1 line.
# ~45 s per scenario (two a round) and ~10 s for L1's boot: 3 rounds take ~5 minutes.
#
# TANDEM_BIN=PATH uses that binary instead of building the release one.
# FAILOVER_VMMS="qemu" (or "tandem") runs one VMM only; the other's medians are then nan.
# FAILOVER_QEMU_FDB=keep: QEMU's unplug without the bridge flush (the plain recipe; its
# outage then is ~0.5 s or ~6 s, as the guest's ARP timers fall).
# FAILOVER_PINGS=FILE: no run, only the analysis of that pinger log (--runs as it had).
# L1's console: resources/cache/bench-failover-l1.log; the pinger's records (see pingmon.c):
# resources/cache/bench-failover-pings.log.
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"
. "$RES/bench/common.sh"

# fo_analyse PINGS : the BENCH lines, from the pinger's records (see the header).
fo_analyse() {
  awk '
  $1 == "S" { st[$2] = $3 + 0; if ($2 + 0 > maxs) maxs = $2 + 0; next }
  $1 == "R" { rt[$2] = $3 + 0; next }
  $1 == "TCP" { tcp[cur] = $0; next }   # the stream of the scenario running (see pingmon.c)
  $1 == "L" && $3 == "FOEV" {
    k = substr($4, 5) " " substr($5, 5); e = substr($6, 4); cur = k
    if (!(k in seen)) { seen[k] = 1; keys[++nk] = k }
    if (!((k, e) in ev)) ev[k, e] = $2 + 0
    if ($7 ~ /^rc=/) evrc[k, e] = substr($7, 4)
    next
  }
  $1 == "L" && $3 == "FOG" {
    k = substr($4, 5) " " substr($5, 5); g[k, $6, ++ng[k, $6]] = $2 + 0
    if ($6 == "tcp") gbytes[k] = substr($7, 7)
  }
  # The longest interval between consecutive replies (in request order) over [a, b): from
  # the last reply to a request sent before a, through the replies to requests sent from a
  # on, to the first reply to one sent at or after b (requests sent at or after c do not
  # count: the scenario is over); -1: none.
  function gap(a, b, c,    q, prev, m, d) {
    prev = -1; m = -1
    for (q = 0; q <= maxs; q++) {
      if (!(q in st) || st[q] >= c) break
      if (!(q in rt)) continue
      if (st[q] < a) { prev = q; continue }
      if (prev >= 0) { d = rt[q] - rt[prev]; if (d > m) m = d }
      prev = q
      if (st[q] >= b) { prev = -1; break }
    }
    # Still no reply at c (or at the end of the records): a gap open since the last reply.
    if (prev >= 0 && c - rt[prev] > m && rt[prev] < c) m = c - rt[prev]
    return m
  }
  function unanswered(a, b,    q, n) {
    for (q = 0; q <= maxs; q++) if ((q in st) && st[q] >= a && st[q] < b && !(q in rt)) n++
    return n + 0
  }
  function answered(a, b,    q, n) {
    for (q = 0; q <= maxs; q++) if ((q in st) && st[q] >= a && st[q] < b && (q in rt)) n++
    return n + 0
  }
  function after(k, what, t,    j) {   # first guest event WHAT of k at or after t, -1: none
    for (j = 1; j <= ng[k, what]; j++) if (g[k, what, j] >= t) return g[k, what, j]
    return -1
  }
  function ms(x) { return x < 0 ? "nan" : sprintf("%.0f", x) }
  function kv2(rec, key,    a, j) {   # the value of key=value in record rec, "" if none
    split(rec, a, " ")
    for (j in a) if (index(a[j], key "=") == 1) return substr(a[j], length(key) + 2)
    return ""
  }
  function tcp_outcome(k,    err, sent) {
    if (!(k in tcp)) return "none"
    err = kv2(tcp[k], "err"); sent = kv2(tcp[k], "sent")
    if (err == 104 || err == 32) return "reset"
    if (err != 0) return "err=" err
    if (kv2(tcp[k], "closed") != 1 || gbytes[k] != sent) return "short=" gbytes[k] "/" sent
    return "ok"
  }
  END {
    for (n = 1; n <= nk; n++) {
      k = keys[n]; split(k, kv, " ")
      ok = 1
      split("unplug unplugged replug replugged end exit", names, " ")
      for (j in names) if (!((k, names[j]) in ev)) ok = 0
      if (evrc[k, "unplugged"] != "0" || evrc[k, "replugged"] != "0" || evrc[k, "exit"] != "0") ok = 0
      if (!ok) { printf "BENCH vmm=%s run=%s outage_ms=nan lost=nan return_ms=nan replug_outage_ms=nan replug_lost=nan rc=1\n", kv[1], kv[2]; continue }
      U = ev[k, "unplug"]; P = ev[k, "replug"]; E = ev[k, "end"]
      before = answered(U - 3000, U)
      back = after(k, "vf-rx", P); gone = after(k, "vf-gone", U)
      ret = back < 0 ? -1 : back - P
      if (before < 100 || ret < 0) ok = 0
      printf "BENCH vmm=%s run=%s outage_ms=%s lost=%d return_ms=%s replug_outage_ms=%s replug_lost=%d", \
        kv[1], kv[2], ms(gap(U, P, E)), unanswered(U, P), ms(ret), ms(gap(P, E, E)), unanswered(P, E)
      t = tcp_outcome(k)
      printf " unplug_cmd_ms=%s eject_ms=%s replug_cmd_ms=%s replies_before=%d tcp=%s tcp_resets=%d rc=%d\n", \
        ms(ev[k, "unplugged"] - U), ms(gone < 0 ? -1 : gone - U), ms(ev[k, "replugged"] - P), before, t, \
        t == "reset", ok ? 0 : 1
    }
  }' "$1"
}

BENCH_RUNS_DEFAULT=3 bench_args "$@"
VMMS=${FAILOVER_VMMS:-tandem qemu}
for v in $VMMS; do
  case $v in tandem|qemu) ;; *) die "FAILOVER_VMMS takes tandem and/or qemu, not '$v'" ;; esac
done
[ -n "${VMMS// /}" ] || die "FAILOVER_VMMS is empty"
QEMU_FDB=${FAILOVER_QEMU_FDB:-flush}
case $QEMU_FDB in flush|keep) ;; *) die "FAILOVER_QEMU_FDB takes flush or keep, not '$QEMU_FDB'" ;; esac
LOG=$CACHE/bench-failover-l1.log
PINGS=$CACHE/bench-failover-pings.log
W=$(mktemp -d "${TMPDIR:-/tmp}/tandem-bench-failover.XXXXXX")
trap 'rm -rf "$W"' EXIT
rc=0
if [ -n "${FAILOVER_PINGS:-}" ]; then
  PINGS=$FAILOVER_PINGS
  say "analysing $PINGS only (FAILOVER_PINGS), $RUNS rounds expected"
else
  need_root "bench/failover.sh (run-l1.sh --igb, and a raw-socket pinger)"
  need_cmd gcc
  "$RES/build-images.sh" >&2
  BIN=-
  case " $VMMS " in *" tandem "*) bench_tandem; BIN=$TANDEM ;; esac

  GUEST=10.98.0.3   # the guest, on tap0's /24 in the bed's network namespace
  TCP_PORT=5003     # where the guest listens for the TCP stream (failover-l1.sh)
  PINGMON=$CACHE/pingmon
  if ! up_to_date "$PINGMON" "$RES/bed/pingmon.c"; then
    gcc -O2 -Wall -o "$PINGMON" "$RES/bed/pingmon.c" || die "building pingmon failed"
  fi

  "$RES/bed/overlay.sh" "$W/overlay.cpio" "$BIN" "$RES/bench/failover-l1.sh:/scenario.sh"
  rm -f "$PINGS"
  nv=$(wc -w <<< "$VMMS")
  tmo=$((RUNS * nv * 150 + 300))   # a scenario takes ~45 s; a hung one is cut off
  say "$RUNS rounds of a failover scenario per VMM ($VMMS), one guest at a time in one L1; L1 log: $LOG"
  L1_NETNS_CMD="exec $(printf %q "$PINGMON") -l \"\$L1_LOG\" -d $GUEST -i 10 -p $TCP_PORT -t $tmo -o $(printf %q "$PINGS")" \
    "$RES/bed/run-l1.sh" --mem 3072 --iommu --igb --timeout "$tmo" \
    --append "tandem.bench_runs=$RUNS tandem.bench_secs=$SECS tandem.fo_vmms=${VMMS// /,} tandem.fo_qemu_fdb=$QEMU_FDB tandem.scenario_timeout=$((tmo - 60))" \
    "$W/overlay.cpio" "$LOG" || rc=$?
  tr -d '\r' < "$LOG" | grep -aE '^(FOINFO|--- |  \| |L1-SCENARIO|L1-STUCK)' >&2 || true
fi
[ -s "$PINGS" ] || die "the pinger wrote nothing to $PINGS (L0 QEMU rc=$rc); see $LOG"

BENCH_LINES=$W/bench
fo_analyse "$PINGS" > "$BENCH_LINES"
cat "$BENCH_LINES"
fail=0
for v in $VMMS; do
  n=$(grep -c "^BENCH vmm=$v .* rc=0$" "$BENCH_LINES" || true)
  [ "$n" = "$RUNS" ] || { fail=1; say "$v: $n of $RUNS rounds measured"; }
done
grep ' rc=0$' "$BENCH_LINES" > "$W/ok" || true
med() { bench_median "$W/ok" "$1" "$2"; }
sum() { awk -v v="vmm=$1" -v k="$2=" '$2 == v { for (j = 3; j <= NF; j++) if (index($j, k) == 1) n += substr($j, length(k) + 1) } END { print n + 0 }' "$W/ok"; }
[ $fail = 0 ] && [ $rc = 0 ] \
  || die "not every round measured every VMM (L0 QEMU rc=$rc); see above, $LOG and $PINGS"
echo "qemu_return_ms=$(med qemu return_ms)" \
  "replug_outage_ms=$(med tandem replug_outage_ms) qemu_replug_outage_ms=$(med qemu replug_outage_ms)" \
  "replug_lost=$(med tandem replug_lost) qemu_replug_lost=$(med qemu replug_lost)" \
  "unplug_cmd_ms=$(med tandem unplug_cmd_ms) qemu_unplug_cmd_ms=$(med qemu unplug_cmd_ms)" \
  "tcp_resets=$(sum tandem tcp_resets) qemu_tcp_resets=$(sum qemu tcp_resets)"
echo "outage_ms=$(med tandem outage_ms) qemu_outage_ms=$(med qemu outage_ms)" \
  "lost=$(med tandem lost) qemu_lost=$(med qemu lost) return_ms=$(med tandem return_ms)"
