#!/usr/bin/env bash
# Fuzzes the parsers that take outside bytes for SECONDS each (default 30):
# frames, pack indexes, manifests, working sets and memory layouts
# (engine/fuzz) and virtio-blk requests and the userfaultfd handshake
# (vmm-glue/fuzz). Uses the stable toolchain with
# RUSTC_BOOTSTRAP=1 for the sanitizer flags cargo-fuzz passes, so no
# nightly is needed. Both fuzz crates share one target directory. Crashes
# land in <crate>/fuzz/artifacts/<target>/. To refresh the seeds after a
# long run: cargo fuzz cmin TARGET fuzz/corpus/TARGET, then copy it to
# fuzz/seeds/TARGET.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
export PATH="$HOME/.cargo/bin:$PATH"
seconds=${1:-30}
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --quiet
export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="$root/target/fuzz"
for spec in engine:frame_decode engine:pack_index_decode engine:manifest_decode \
    engine:working_set_decode engine:mem_layout_decode \
    vmm-glue:blk_request vmm-glue:uffd_handshake; do
    crate=${spec%%:*} target=${spec#*:}
    cd "$root/$crate"
    echo "fuzz: $crate $target for ${seconds}s" >&2
    mkdir -p "fuzz/corpus/$target"
    log=$(mktemp)
    # New inputs go to fuzz/corpus (not kept); the run starts from the
    # committed seeds too (fuzz/seeds: a corpus minimized with
    # `cargo fuzz cmin`, so a fresh machine starts where earlier runs got).
    if ! cargo fuzz run --release "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" \
        -- -max_total_time="$seconds" -rss_limit_mb=1024 >"$log" 2>&1; then
        tail -40 "$log" >&2
        echo "fuzz: $target failed; crash inputs are in $crate/fuzz/artifacts/$target" >&2
        exit 1
    fi
    grep -E "^Done" "$log" >&2 || true
    rm -f "$log"
done
