#!/usr/bin/env bash
# Runs the SQLite suite benchmark (the README's headline table) on a fresh
# machine: installs what is needed (QEMU, qemu-storage-daemon, the S3
# server), builds the guest fixture (fixtures/build-sqlite-guest.sh) and
# cairn, then `cairn bench sqlite` with cairn's remote tier on the S3 server.
# With no arguments it runs what the README records, in one run: every mode
# (default and fsync 5 times, large, storage and image 3 times) on a 192 MiB
# guest, into target/bench/sqlite.{json,md} and target/bench/sqlite-MODE.svg
# (about 70 minutes). Arguments replace that with one run of
# `cairn bench sqlite ARGS` (e.g. --modes fsync --repeat 5).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/dev/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
guest=$(fixtures/build-sqlite-guest.sh)
eval "$(tools/dev/s3-server.sh start)"
trap 'tools/dev/s3-server.sh stop' EXIT
benches/loopback-quickack.sh
cargo build --release -p cairn -p cairn-benches
mkdir -p target/bench
bench() {
    target/release/cairn --store "s3://sqlite-bench/root?endpoint=$CAIRN_TEST_S3_ENDPOINT" \
        bench sqlite --guest-dir "$guest" "$@"
}
if [ $# -gt 0 ]; then
    bench "$@"
else
    bench --json-out target/bench/sqlite.json --plot-dir target/bench
fi
