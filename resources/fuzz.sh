#!/bin/bash
# fuzz.sh [SECONDS] — build every fuzz target under fuzz/ (cargo-fuzz, nightly; release
# with debug assertions and AddressSanitizer, cargo fuzz's defaults) and run each for
# SECONDS (default 20), one after another. Corpora grow in fuzz/corpus/TARGET (git-ignored)
# from the committed seeds in fuzz/seeds/TARGET, if any. Prints one line per target and
# exits non-zero, naming the target and the crashing input, when one fails.
# FUZZ_TARGETS="a b" runs only those.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

secs=${1:-20}
[[ $secs =~ ^[1-9][0-9]*$ ]] || die "usage: fuzz.sh [SECONDS] (a whole number of seconds, got '$secs')"

if ! command -v cargo-fuzz >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo-fuzz" ]; then
  say "cargo install cargo-fuzz --locked"
  cargo install cargo-fuzz --locked
fi
export PATH=$HOME/.cargo/bin:$PATH
rustup run nightly rustc --version >/dev/null 2>&1 || die "the nightly toolchain is missing: rustup toolchain install nightly"

cd "$ROOT/fuzz"
say "cargo +nightly fuzz build --release --debug-assertions"
cargo +nightly fuzz build --release --debug-assertions
bin=${CARGO_TARGET_DIR:-$ROOT/fuzz/target}/x86_64-unknown-linux-gnu/release

targets=${FUZZ_TARGETS:-$(cargo +nightly fuzz list)}
failed=()
for t in $targets; do
  corpus=$ROOT/fuzz/corpus/$t artifacts=$ROOT/fuzz/artifacts/$t
  mkdir -p "$corpus" "$artifacts"
  seeds=()
  [ -d "$ROOT/fuzz/seeds/$t" ] && seeds=("$ROOT/fuzz/seeds/$t")
  log=$artifacts/last-run.log
  start=$SECONDS
  # -timeout: one input taking over 10 s is a hang; -rss_limit_mb: a runaway allocation.
  set +e
  "$bin/$t" "$corpus" "${seeds[@]}" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1
  rc=$?
  set -e
  execs=$(awk '/stat::number_of_executed_units:/ {print $2}' "$log" | tail -n1)
  artifact=$(grep -o "Test unit written to [^ ]*" "$log" | tail -n1 | sed 's/^Test unit written to //') || true
  if [ "$rc" -ne 0 ] || [ -n "$artifact" ]; then
    echo "fuzz $t: FAILED after ${execs:-?} execs in $((SECONDS - start)) s (exit $rc): ${artifact:-no artifact}, log $log"
    grep -m1 -E "panicked at|ERROR: AddressSanitizer|ERROR: libFuzzer" -A3 "$log" || true
    failed+=("$t")
  else
    echo "fuzz $t: ${execs:-?} execs in $((SECONDS - start)) s, 0 crashes"
  fi
done

if [ ${#failed[@]} -ne 0 ]; then
  die "fuzz targets failed: ${failed[*]} (reproduce: fuzz/target/x86_64-unknown-linux-gnu/release/TARGET ARTIFACT)"
fi
say "all fuzz targets ran ${secs} s without a crash"
