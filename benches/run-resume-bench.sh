#!/usr/bin/env bash
# Runs the resume benchmark on a fresh machine: installs what is needed
# (the S3 server among it), builds cairn in release mode and prints the
# figures, the S3-only rows included. Extra
# arguments go to resume-bench (e.g. --size-mib 256 --sweep-kib 4,64).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/dev/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
eval "$(tools/dev/s3-server.sh start)"
trap 'tools/dev/s3-server.sh stop' EXIT
benches/loopback-quickack.sh
cargo build --release -p cairn -p cairn-benches
mkdir -p target/bench
target/release/resume-bench --s3 "$@"
