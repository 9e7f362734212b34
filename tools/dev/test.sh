#!/usr/bin/env bash
# Runs every test on a fresh machine: installs what is needed, starts the
# S3 server, builds the guest fixture and cairn once (release), then lint,
# unit and integration tests, the QEMU end-to-end tests and a fuzz smoke run.
# moto's S3 server runs beside s3s-fs for the catalog's race tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
tools/dev/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
# The guest for the QEMU end-to-end tests (reused when already built).
CAIRN_GUEST_DIR=$(fixtures/build-guest.sh)
export CAIRN_GUEST_DIR
# The SQLite benchmark's guest (its program built statically).
CAIRN_SQLITE_GUEST_DIR=$(fixtures/build-sqlite-guest.sh)
export CAIRN_SQLITE_GUEST_DIR
# Huge pages for the page server's 2 MiB-page region tests (root only).
# Tests whose prerequisite is missing (huge pages, root, FUSE for the
# overlay's crash tests) say so and skip that part, except under CI=true
# (.ci/run sets it), where they fail.
if [ -w /proc/sys/vm/nr_hugepages ] && [ "$(cat /proc/sys/vm/nr_hugepages)" -lt 16 ]; then
    echo 16 >/proc/sys/vm/nr_hugepages || true
fi
eval "$(tools/dev/s3-server.sh start)"
eval "$(tools/dev/moto-server.sh start)"
# The OCI registries (open and htpasswd) the image import tests pull from.
eval "$(tools/dev/registry-server.sh start)"
trap 'tools/dev/s3-server.sh stop; tools/dev/moto-server.sh stop; tools/dev/registry-server.sh stop' EXIT
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
# Every test binary runs even when one fails, so one run shows every failure.
cargo test --release --workspace --no-fail-fast
tools/dev/fuzz.sh "${CAIRN_FUZZ_SECONDS:-20}"
