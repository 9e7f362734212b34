#!/usr/bin/env bash
# Installs what cairn's build, tests and benchmarks need on a fresh Debian 12
# machine: system packages, the Rust toolchain's parts, and s3s-fs (the S3
# server the tests use) and moto's S3 server (the catalog's race tests:
# its conditional writes are atomic). Idempotent: skips what is already there.
# CAIRN_SETUP_S3=0 skips s3s-fs and moto (the file:// demo needs neither).
set -euo pipefail
sudo=; [ "$(id -u)" = 0 ] || sudo=sudo

need_apt=()
for pkg in libclang-dev zstd b3sum e2fsprogs time debootstrap iproute2 curl \
    qemu-system-x86 qemu-utils busybox-static cpio kmod xz-utils \
    python3 umoci skopeo docker-registry apache2-utils bubblewrap; do
    dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    echo "setup: installing ${need_apt[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null && [ -x "$HOME/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
if ! command -v cargo >/dev/null; then
    echo "setup: installing the Rust toolchain (rustup, stable)" >&2
    curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal --component clippy,rustfmt >&2
    export PATH="$HOME/.cargo/bin:$PATH"
fi
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt

if [ "${CAIRN_SETUP_S3:-1}" != 0 ] && { ! command -v s3s-fs >/dev/null || ! s3s-fs --version 2>/dev/null | grep -q '0.14.1'; }; then
    echo "setup: building s3s-fs 0.14.1 (about 2 minutes)" >&2
    cargo install s3s-fs@0.14.1 --locked --features binary --quiet
fi

# moto's S3 server, from the machine's configured Python package index.
# 5.2.5 or later: 5.2.1 answers a conditional multipart completion with a
# body the AWS SDK cannot parse (CompleteMultipartUploadResponse).
moto_ok='import moto.server, flask, sys
v = tuple(int(x) for x in moto.__version__.split(".")[:3])
sys.exit(v < (5, 2, 5))'
if [ "${CAIRN_SETUP_S3:-1}" != 0 ] && ! python3 -c "$moto_ok" 2>/dev/null; then
    echo "setup: installing moto's S3 server (pip: moto[server]>=5.2.5)" >&2
    python3 -m pip --version >/dev/null 2>&1 || {
        export DEBIAN_FRONTEND=noninteractive
        $sudo apt-get install -y -qq python3-pip >/dev/null
    }
    # Debian's own Python refuses system-wide pip installs unless told.
    python3 -m pip install --quiet --upgrade 'moto[server]>=5.2.5' 2>/dev/null ||
        python3 -m pip install --quiet --upgrade --break-system-packages 'moto[server]>=5.2.5'
fi
