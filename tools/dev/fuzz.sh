#!/usr/bin/env bash
# Fuzzes the parsers that take outside bytes (frame, pack index, manifest)
# for SECONDS each (default 30). Uses the stable toolchain with
# RUSTC_BOOTSTRAP=1 for the sanitizer flags cargo-fuzz passes, so no
# nightly is needed. Crashes land in engine/fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../../engine"
export PATH="$HOME/.cargo/bin:$PATH"
seconds=${1:-30}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
export RUSTC_BOOTSTRAP=1
for target in frame_decode pack_index_decode manifest_decode; do
    echo "fuzz: $target for ${seconds}s" >&2
    mkdir -p "fuzz/corpus/$target"
    log=$(mktemp)
    if ! cargo fuzz run --release "$target" -- -max_total_time="$seconds" -rss_limit_mb=1024 >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "fuzz: $target failed; crash inputs are in engine/fuzz/artifacts/$target" >&2
        exit 1
    fi
    grep -E "^Done" "$log" >&2 || true
    rm -f "$log"
done
