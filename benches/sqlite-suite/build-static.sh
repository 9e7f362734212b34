#!/usr/bin/env bash
# Builds sqlite-suite as a static executable (glibc, crt-static) that runs
# in a guest with nothing but busybox, and prints its path on stdout.
# Cargo's messages go to stderr.
#
# The explicit --target keeps RUSTFLAGS away from build scripts and proc
# macros (which must stay dynamic) and puts the result under
# target/x86_64-unknown-linux-gnu/release/.
set -euo pipefail

target=x86_64-unknown-linux-gnu
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-C target-feature=+crt-static" \
    cargo build --quiet --release -p cairn-sqlite-suite --target "$target" >&2

target_dir="$(cargo metadata --format-version 1 --no-deps \
    | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
bin="$target_dir/$target/release/sqlite-suite"
if command -v file >/dev/null && ! file "$bin" | grep -Eq 'statically linked|static-pie linked'; then
    echo "build-static.sh: $bin is not statically linked" >&2
    exit 1
fi
echo "$bin"
