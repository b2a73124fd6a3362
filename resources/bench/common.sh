# Shared by resources/bench/boot.sh, net.sh and blk.sh (host side, bash). Sourced after lib/common.sh.
# shellcheck shell=bash

# bench_args "$@" : --runs N (rounds: in each, every measurement is taken once per VMM, the
# VMM going first alternating; default 6) and --secs S (length of a measurement; default 5),
# into RUNS and SECS. A bench with other defaults sets BENCH_RUNS_DEFAULT / BENCH_SECS_DEFAULT.
bench_args() {
  local usage="usage: $(basename "$0") [--runs N] [--secs S]"
  RUNS=${BENCH_RUNS_DEFAULT:-6} SECS=${BENCH_SECS_DEFAULT:-5}
  while [ $# -gt 0 ]; do
    case $1 in
      --runs) RUNS=${2:?$usage}; shift 2 ;;
      --secs) SECS=${2:?$usage}; shift 2 ;;
      *) die "$usage" ;;
    esac
  done
  case $RUNS$SECS in *[!0-9]*) die "--runs and --secs take whole numbers" ;; esac
  [ "$RUNS" -gt 0 ] && [ "$SECS" -gt 0 ] || die "--runs and --secs take numbers > 0"
}

# bench_setup "$@" : bench_args, the guest images, and the tandem binary (bench_tandem).
bench_setup() {
  bench_args "$@"
  "$RES/build-images.sh" >&2
  bench_tandem
}

# bench_tandem : TANDEM = $TANDEM_BIN, or the release build of tandem-vmm.
bench_tandem() {
  cd "$ROOT"
  if [ -n "${TANDEM_BIN:-}" ]; then
    TANDEM=$(realpath "$TANDEM_BIN")
  else
    say "cargo build --release -p tandem-vmm"
    cargo build --release -p tandem-vmm >&2
    TANDEM=${CARGO_TARGET_DIR:-$ROOT/target}/release/tandem
  fi
  [ -x "$TANDEM" ] || die "no tandem binary at $TANDEM"
  case $TANDEM in *qemu-as-tandem*) say "NOTE: TANDEM_BIN is the QEMU test double: both sides are QEMU 7.2" ;; esac
}

# bench_median FILE VMM KEY : the median of KEY=value over the "BENCH vmm=VMM ..." lines of
# FILE (the mean of the two middle ones for an even count), "nan" when there is none.
bench_median() {
  awk -v vmm="$2" -v key="$3" '
    $1 == "BENCH" && $2 == "vmm=" vmm {
      for (i = 3; i <= NF; i++) { n = index($i, "="); if (substr($i, 1, n - 1) == key) print substr($i, n + 1) }
    }' "$1" | sort -g | awk '{a[NR] = $1} END {
      if (NR == 0) { print "nan"; exit }
      if (NR % 2) print a[(NR + 1) / 2]; else print (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# bench_ratio A B : A / B with 3 decimals ("nan" if either is missing or B is 0).
bench_ratio() {
  awk -v a="$1" -v b="$2" 'BEGIN { if (a == "nan" || b == "nan" || b + 0 == 0) print "nan"; else printf "%.3f\n", a / b }'
}

# bench_paired_ratio FILE KEY : the median over runs i of
#   median(KEY of tandem in run i) / median(KEY of qemu in run i)
# Both VMMs of a run are measured seconds apart in the same L1, so slow drifts of the nested
# bed (TCG's code cache warming up, the host's load) cancel out of each run's ratio.
bench_paired_ratio() {
  local runs i t q
  runs=$(awk '$1 == "BENCH" { for (i = 2; i <= NF; i++) if ($i ~ /^run=/) print substr($i, 5) }' "$1" | sort -un)
  for i in $runs; do
    t=$(grep " run=$i " "$1" | bench_median_stdin tandem "$2")
    q=$(grep " run=$i " "$1" | bench_median_stdin qemu "$2")
    bench_ratio "$t" "$q"
  done | grep -v nan | sort -g | awk '{a[NR] = $1} END {
      if (NR == 0) { print "nan"; exit }
      if (NR % 2) printf "%.3f\n", a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'
}

# bench_median_stdin VMM KEY : bench_median of the BENCH lines on stdin.
bench_median_stdin() {
  local f
  f=$(mktemp)
  cat > "$f"
  bench_median "$f" "$1" "$2"
  rm -f "$f"
}

# bench_in_l1 NAME L1_SCRIPT WHAT KEY_A KEY_B : runs L1_SCRIPT (which prints "BENCH vmm=..."
# lines, see l1-lib.sh) as the scenario of one L1 with the release tandem ($TANDEM) and
# qemu-as-tandem, RUNS rounds of SECS; prints the BENCH lines and each VMM's medians of KEY_A
# and KEY_B, and dies unless every round measured both with the VMM exiting 0. WHAT names a
# round for the log ("2 x 5 s"). The BENCH lines stay in $BENCH_LINES for bench_paired_ratio.
# BENCH_L1_ARGS: more run-l1.sh options (e.g. "--iommu --igb"); BENCH_GUESTS: how the
# scenario runs its guests, for the log line (default "both guests up at once").
bench_in_l1() {
  local name=$1 script=$2 what=$3 ka=$4 kb=$5 log rc=0 ok=1 vmm n bad
  W=$(mktemp -d "${TMPDIR:-/tmp}/tandem-bench-$name.XXXXXX")
  trap 'rm -rf "$W"' EXIT
  "$RES/bed/overlay.sh" "$W/overlay.cpio" "$TANDEM" "$script:/scenario.sh" \
    "$RES/bench/qemu-as-tandem.sh:/bin/qemu-as-tandem" "$RES/bench/l1-lib.sh:/lib/bench-l1.sh"
  log=$CACHE/bench-$name-l1.log
  say "$RUNS rounds of $what per VMM, ${BENCH_GUESTS:-both guests up at once} in one L1; L1 log: $log"
  # shellcheck disable=SC2086  # BENCH_L1_ARGS: more run-l1.sh options, word-split
  "$RES/bed/run-l1.sh" --mem 3072 --timeout $((RUNS * 300 + 900)) ${BENCH_L1_ARGS:-} \
    --append "tandem.bench_runs=$RUNS tandem.bench_secs=$SECS" "$W/overlay.cpio" "$log" || rc=$?
  BENCH_LINES=$W/bench
  tr -d '\r' < "$log" | grep -E '^BENCH ' > "$BENCH_LINES" || true
  tr -d '\r' < "$log" | grep -E '^(--- |  \| )' || true
  cat "$BENCH_LINES"
  for vmm in tandem qemu; do
    n=$(grep -c "^BENCH vmm=$vmm .* rc=0$" "$BENCH_LINES" || true)
    bad=$(grep "^BENCH vmm=$vmm " "$BENCH_LINES" | grep -c -E ' rc=[1-9]|=0 ' || true)
    [ "$n" -gt 0 ] && [ "$bad" = 0 ] || ok=0
    printf '%-6s rounds_ok=%s %s_median=%s %s_median=%s\n' "$vmm" "$n" \
      "$ka" "$(bench_median "$BENCH_LINES" $vmm "$ka")" "$kb" "$(bench_median "$BENCH_LINES" $vmm "$kb")"
  done
  [ $ok = 1 ] && [ $rc = 0 ] \
    || die "not every round measured $ka and $kb with the VMM exiting 0 (L0 QEMU rc=$rc); see above and $log"
}
