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
# s3s-fs does not set TCP_NODELAY: a streamed body written after its headers
# waits for the client's delayed ACK (40 ms on Linux), which would swamp both
# cairn and the direct-GET baseline. Real S3 endpoints do not behave so;
# turning delayed ACKs off on the loopback route removes the artefact.
$sudo ip route change local 127.0.0.1 dev lo proto kernel scope host src 127.0.0.1 \
    table local quickack 1 ||
    echo "warning: could not set quickack on lo; S3 latencies include 40 ms delayed-ACK stalls" >&2
eval "$(tools/dev/s3-server.sh start)"
trap 'tools/dev/s3-server.sh stop' EXIT
cargo build --release --workspace --bins
mkdir -p target/bench
target/release/store-bench --image "$image" --json-out target/bench/store.json "$@"
