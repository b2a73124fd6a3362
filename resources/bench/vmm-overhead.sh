#!/bin/bash
# bench/vmm-overhead.sh [--runs N] [--baseline REV] — what the VMM itself costs, on the
# host's KVM (no nested bed): start time, RSS, and how fast the control socket answers
# while the guest hammers the VMM with exits. A benchmark, not a test.
#
# The guest is a hand-made ELF "kernel" (written here with printf): 64-bit code that prints
# 'K' on COM1 and then either halts (idle) or loops on an unhandled port read and an MMIO
# write outside RAM (hammer: every iteration is two exits to the vCPU thread).
# Binaries, built --release side by side in one run:
#   now       this checkout, --seccomp on (the default)
#   now-off   this checkout, --seccomp off
#   base      REV (default: the commit before the seccomp and library work), its defaults
# Per binary, N runs (default 10) of:
#   start_ms  exec -> the guest's 'K' in the serial file (KVM set-up, ELF load, ACPI, vCPU)
#   rss_kib   VmRSS of tandem once the guest runs (64 MiB guest, touched only where written)
#   anon_kib  its RssAnon: the memory private to this VMM (the rest of RSS is the pages of
#             the binary and libraries it touched, shared by every tandem on the host)
#   info_ms   200 `tandem ctl info` against the idle guest and against the hammering one:
#             p50, p99 and max of the round trip (a process start each: the floor is ~1 ms)
# Prints one line per binary and mode with medians over the runs, then the ratios.
set -euo pipefail
. "$(dirname "$0")/../lib/common.sh"
need_root "bench/vmm-overhead.sh"
[ -c /dev/kvm ] || die "needs /dev/kvm"

RUNS=10
BASE_REV=1e708f0
while [ $# -gt 0 ]; do
  case $1 in
    --runs) RUNS=$2; shift 2 ;;
    --baseline) BASE_REV=$2; shift 2 ;;
    *) die "unknown argument $1 (--runs N, --baseline REV)" ;;
  esac
done

WORK=$CACHE/bench-overhead
mkdir -p "$WORK"

say "building this checkout (release)"
(cd "$ROOT" && cargo build --release --bin tandem -q)
NOW=$ROOT/target/release/tandem
say "building $BASE_REV (release) in $WORK/base"
if [ ! -d "$WORK/base/.git" ] && [ ! -f "$WORK/base/.git" ]; then
  git -C "$ROOT" worktree add -f --detach "$WORK/base" "$BASE_REV" >/dev/null
fi
git -C "$WORK/base" checkout -q --detach "$BASE_REV"
(cd "$WORK/base" && CARGO_TARGET_DIR=$WORK/base-target cargo build --release --bin tandem -q)
BASE=$WORK/base-target/release/tandem

# le N BYTES: N as BYTES little-endian bytes, as printf escapes.
le() { local v=$1 n=$2 out=""; for _ in $(seq "$n"); do out+=$(printf '\\x%02x' $((v & 255))); v=$((v >> 8)); done; printf '%s' "$out"; }
# elf FILE CODE-ESCAPES CODE-LEN: an ELF64 executable, one PT_LOAD of CODE at 1 MiB, entry there.
elf() {
  local load=$((0x100000))
  {
    printf '\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00'
    printf "$(le 2 2)$(le 62 2)$(le 1 4)$(le $load 8)$(le 64 8)$(le 0 8)$(le 0 4)"
    printf "$(le 64 2)$(le 56 2)$(le 1 2)$(le 64 2)$(le 0 2)$(le 0 2)"
    printf "$(le 1 4)$(le 5 4)$(le 120 8)$(le $load 8)$(le $load 8)$(le "$3" 8)$(le "$3" 8)$(le 4096 8)"
    printf "$2"
  } > "$1"
}
# mov dx,0x3f8; mov al,'K'; out dx,al; then
PRINT_K='\x66\xba\xf8\x03\xb0\x4b\xee'
# idle: hlt; jmp back to the hlt
elf "$WORK/idle.elf" "${PRINT_K}\xf4\xeb\xfd" 10
# hammer: mov dx,0x1234; in al,dx; mov byte [0x10000000],0x5a; jmp back to the mov dx
elf "$WORK/hammer.elf" "${PRINT_K}\x66\xba\x34\x12\xec\xc6\x04\x25\x00\x00\x00\x10\x5a\xeb\xf1" 22

# Microseconds from bash's own clock: $(date) would fork a process (~1 ms) inside each
# measurement.
us() { REPLY=${EPOCHREALTIME/./}; }

# one BIN MODE ELF EXTRA... : one run; prints "start_us rss_kib p50_us p99_us max_us anon_kib".
exec {NAP}<> <(:)
one() {
  local bin=$1 elf=$2; shift 2
  local sock=$WORK/api.sock log=$WORK/serial.log
  rm -f "$sock" "$log"
  local t0; us; t0=$REPLY
  "$bin" --kernel "$elf" --memory 64M --serial "file=$log" --api-socket "$sock" "$@" 2>"$WORK/stderr" &
  local pid=$!
  local i=0
  # Polled every 0.1 ms without a process per look (read's timeout on a pipe nobody
  # writes): a `sleep 0.001` per look would make the start time 1 ms coarse.
  until [ -s "$log" ]; do
    read -r -t 0.0001 -u "$NAP" _ || true; i=$((i + 1))
    [ $i -lt 50000 ] || { kill $pid; die "$bin never started its guest: $(cat "$WORK/stderr")"; }
  done
  us; local start=$(( REPLY - t0 ))
  while [ ! -S "$sock" ]; do sleep 0.001; done
  sleep 0.2
  local rss anon
  rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")
  anon=$(awk '/^RssAnon/ { print $2 }' "/proc/$pid/status")
  local lat=()
  for _ in $(seq 200); do
    local a; us; a=$REPLY
    "$bin" ctl --api-socket "$sock" info >/dev/null
    us; lat+=($(( REPLY - a )))
  done
  "$bin" ctl --api-socket "$sock" shutdown >/dev/null
  wait $pid || true
  local sorted; sorted=$(printf '%s\n' "${lat[@]}" | sort -n)
  echo "$start $rss $(echo "$sorted" | sed -n 100p) $(echo "$sorted" | sed -n 198p) $(echo "$sorted" | tail -n1) $anon"
}

declare -A RESULT
for round in $(seq "$RUNS"); do
  for cfg in now now-off base; do
    case $cfg in
      now) bin=$NOW; extra=(--seccomp on) ;;
      now-off) bin=$NOW; extra=(--seccomp off) ;;
      base) bin=$BASE; extra=() ;;
    esac
    for mode in idle hammer; do
      RESULT[$cfg.$mode]+="$(one "$bin" "$WORK/$mode.elf" "${extra[@]}")"$'\n'
    done
  done
  say "round $round/$RUNS done"
done

echo "# binary mode: medians over $RUNS runs; info round trip in ms (200 requests a run)"
for cfg in now now-off base; do
  for mode in idle hammer; do
    echo "${RESULT[$cfg.$mode]}" | awk -v cfg="$cfg" -v mode="$mode" '
      function med(c,   n, i, j, t, v) {
        n = 0; for (i = 1; i <= rows; i++) v[++n] = col[i, c]
        for (i = 2; i <= n; i++) for (j = i; j > 1 && v[j - 1] > v[j]; j--) { t = v[j]; v[j] = v[j - 1]; v[j - 1] = t }
        return v[int((n + 1) / 2)]
      }
      NF { rows++; for (c = 1; c <= 6; c++) col[rows, c] = $c }
      END { printf "%-8s %-6s start_ms=%.2f rss_kib=%d anon_kib=%d info_p50_ms=%.2f info_p99_ms=%.2f info_max_ms=%.2f\n",
              cfg, mode, med(1) / 1000, med(2), med(6), med(3) / 1000, med(4) / 1000, med(5) / 1000 }'
  done
done | tee "$WORK/result.txt"
# Ratios of this checkout (seccomp on) to the baseline and to itself without seccomp.
awk '{ for (i = 3; i <= NF; i++) { split($i, kv, "="); v[$1, $2, kv[1]] = kv[2] } }
  END { split("idle hammer", ms, " ")
        for (k = 1; k <= 2; k++) { m = ms[k]
          printf "ratio %-6s now/base start=%.2f rss=%.2f anon=%.2f info_p99=%.2f   now/now-off start=%.2f rss=%.2f anon=%.2f info_p99=%.2f\n", m,
            v["now", m, "start_ms"] / v["base", m, "start_ms"], v["now", m, "rss_kib"] / v["base", m, "rss_kib"],
            v["now", m, "anon_kib"] / v["base", m, "anon_kib"], v["now", m, "info_p99_ms"] / v["base", m, "info_p99_ms"],
            v["now", m, "start_ms"] / v["now-off", m, "start_ms"], v["now", m, "rss_kib"] / v["now-off", m, "rss_kib"],
            v["now", m, "anon_kib"] / v["now-off", m, "anon_kib"], v["now", m, "info_p99_ms"] / v["now-off", m, "info_p99_ms"] } }' "$WORK/result.txt"
