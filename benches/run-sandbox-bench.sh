#!/usr/bin/env bash
# Runs the sandbox benchmark: builds cairn and sandbox-bench in release mode
# and runs them (a `cairn daemon` on a file:// store in a temporary
# directory, driven through its API; qemu-img/qemu-io and cp as baselines).
# Extra arguments go to sandbox-bench (e.g. --sizes 1G,10G --clones 200,
# or --store s3://... with credentials in the environment).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/dev/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release -p cairn --bin cairn
cargo build --release -p cairn-benches --bin sandbox-bench
target/release/sandbox-bench --json-out docs/bench/sandbox.json "$@"
