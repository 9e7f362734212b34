#!/usr/bin/env bash
# The main job on the embedded default store (file:// under the user's data
# directory): build or reuse the Debian rootfs fixture, import it, describe
# it, export it back and compare, then verify the store deeply.
# Usage: tools/dev/image-demo.sh            (CAIRN_STORE=... to use another store)
set -euo pipefail
cd "$(dirname "$0")/../.."
CAIRN_SETUP_S3=0 tools/dev/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
sudo=; [ "$(id -u)" = 0 ] || sudo=sudo
image=$($sudo fixtures/build-rootfs-image.sh)
cargo build --release --quiet -p cairn
cairn=target/release/cairn
echo "== store: ${CAIRN_STORE:-embedded default}"
echo "== import $image"
$cairn image import-raw "$image" --name debian-rootfs
echo "== import again (content-addressed: nothing new is stored)"
$cairn image import-raw "$image" --name debian-rootfs
echo "== describe"
$cairn image describe debian-rootfs
out=$(mktemp --tmpdir cairn-export.XXXXXX)
trap 'rm -f "$out"' EXIT
echo "== export and compare"
$cairn image export debian-rootfs "$out"
cmp "$image" "$out" && echo "export is byte-identical to $image"
echo "== verify --deep"
$cairn verify --deep
