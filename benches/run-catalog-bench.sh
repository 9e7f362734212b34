#!/usr/bin/env bash
# Runs the catalog benchmark on a fresh machine: installs what is needed,
# starts moto's S3 server, builds in release mode and prints per-operation
# latency at 1,000, 10,000 and 100,000 sandbox records on file:// and on
# moto. Extra arguments go to catalog-bench (e.g. --sizes 1000,10000).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/dev/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
eval "$(tools/dev/moto-server.sh start)"
cargo build --release -p cairn-benches --bin catalog-bench
target/release/catalog-bench "$@"
