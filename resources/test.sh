#!/bin/bash
# test.sh [cargo test args...] — build the images, build every binary of the workspace
# (the integration tests boot target/debug/tandem in the nested bed), run the tests.
# Extra arguments go to `cargo test`, e.g. resources/test.sh -p tandem-tests -- --nocapture
# Then every fuzz target is built and run briefly (FUZZ_SECS each, default 10; 0 skips it),
# whether or not a test failed: one red bed must not hide a fuzz target that stopped building.
# Exits non-zero if either failed.
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

"$RES/build-images.sh"
cd "$ROOT"
say "cargo build --workspace --bins"
cargo build --workspace --bins
say "cargo test --workspace $*"
tests_rc=0
cargo test --workspace --no-fail-fast "$@" || tests_rc=$?
fuzz_rc=0
if [ "${FUZZ_SECS:-10}" != 0 ]; then
  "$RES/fuzz.sh" "${FUZZ_SECS:-10}" || fuzz_rc=$?
fi
[ $tests_rc = 0 ] || die "cargo test failed (exit $tests_rc); its report is above"
[ $fuzz_rc = 0 ] || die "fuzz.sh failed (exit $fuzz_rc); its report is above"
