#!/usr/bin/env bash
# Runs every test on a fresh machine: installs what is needed, starts the
# S3 server, builds once (release), then lint and tests.
set -euo pipefail
cd "$(dirname "$0")/../.."
tools/dev/setup.sh
eval "$(tools/dev/s3-server.sh start)"
trap 'tools/dev/s3-server.sh stop' EXIT
cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --release --workspace
