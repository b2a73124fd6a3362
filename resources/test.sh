#!/bin/bash
# test.sh [cargo test args...] — build the images, build every binary of the workspace
# (the integration tests boot target/debug/tandem in the nested bed), run the tests.
# Extra arguments go to `cargo test`, e.g. resources/test.sh -p tandem-tests -- --nocapture
set -euo pipefail
. "$(dirname "$0")/lib/common.sh"

"$RES/build-images.sh"
cd "$ROOT"
say "cargo build --workspace --bins"
cargo build --workspace --bins
say "cargo test --workspace $*"
cargo test --workspace --no-fail-fast "$@"
