#!/usr/bin/env bash
# Runs the store benchmark on a fresh machine: installs what is needed,
# builds (or reuses) the Debian rootfs fixture, starts the S3 server, builds
# cairn in release mode and prints the figures. Extra arguments go to
# store-bench (e.g. --sweep-kib 64,128,256,1024 for the chunk-size sweep).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/dev/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
image=$($sudo fixtures/build-rootfs-image.sh)
$sudo chown "$(id -u):$(id -g)" "$image"
benches/loopback-quickack.sh
eval "$(tools/dev/s3-server.sh start)"
trap 'tools/dev/s3-server.sh stop' EXIT
cargo build --release --workspace --bins
mkdir -p target/bench
target/release/store-bench --image "$image" --json-out target/bench/store.json "$@"
