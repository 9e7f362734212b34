#!/usr/bin/env bash
# Installs what cairn's build, tests and benchmarks need on a fresh Debian 12
# machine: system packages, the Rust toolchain's parts, and s3s-fs (the S3
# server the tests use). Idempotent: skips what is already there.
set -euo pipefail

need_apt=()
for pkg in libclang-dev zstd b3sum e2fsprogs; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
    echo "setup: cargo is missing; install Rust (rustup) first" >&2
    exit 1
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

if ! command -v s3s-fs >/dev/null || ! s3s-fs --version 2>/dev/null | grep -q '0.14.1'; then
    echo "setup: building s3s-fs 0.14.1 (about 2 minutes)" >&2
    cargo install s3s-fs@0.14.1 --locked --features binary --quiet
fi
