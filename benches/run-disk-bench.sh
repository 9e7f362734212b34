#!/usr/bin/env bash
# Runs the disk benchmark on a fresh machine: installs what is needed
# (QEMU, qemu-storage-daemon, the S3 server), builds or reuses the guest
# fixture and the Debian root file system (for the boot part's laziness
# measurement), builds cairn in release mode and prints the figures. Extra
# arguments go to disk-bench (e.g. --only io --seconds 5).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/dev/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
CAIRN_GUEST_DIR=$(fixtures/build-guest.sh)
export CAIRN_GUEST_DIR
sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
debian=$($sudo fixtures/build-rootfs-image.sh)
$sudo chown "$(id -u):$(id -g)" "$debian"
benches/loopback-quickack.sh
eval "$(tools/dev/s3-server.sh start)"
trap 'tools/dev/s3-server.sh stop' EXIT
cargo build --release --workspace --bins
mkdir -p target/bench
target/release/disk-bench --debian-image "$debian" --json-out target/bench/disk.json "$@"
