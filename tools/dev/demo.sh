#!/usr/bin/env bash
# The main job on the embedded default store (file:// under the user's data
# directory): build or reuse the guest fixture, import its root disk, serve
# it with `cairn disk serve` (empty cache, fresh overlay), boot a Debian
# kernel on it in QEMU, and print the boot time and the bytes read from the
# store. CAIRN_STORE=... uses another store.
set -euo pipefail
cd "$(dirname "$0")/../.."
CAIRN_SETUP_S3=0 tools/dev/setup.sh
export PATH="$HOME/.cargo/bin:$PATH"
guest=$(fixtures/build-guest.sh)
cargo build --release --quiet -p cairn
cairn=$PWD/target/release/cairn
run=$(mktemp -d --tmpdir cairn-demo.XXXXXX)
serve_pid=
trap 'if [ -n "$serve_pid" ]; then kill "$serve_pid" 2>/dev/null || true; fi; rm -rf "$run"' EXIT

echo "== import $guest/rootfs.ext4 into ${CAIRN_STORE:-the embedded default store}"
# The name is the demo's own: a rebuilt fixture (another image) takes it over.
$cairn image rm cairn-guest >/dev/null 2>&1 || true
$cairn image import-raw "$guest/rootfs.ext4" --name cairn-guest
size=$(stat -c %s "$guest/rootfs.ext4")
stored=$($cairn --json image describe cairn-guest | sed -n 's/.*"stored_bytes":\([0-9]*\).*/\1/p')

echo "== serve it (empty cache, new overlay) and boot"
mkfifo "$run/out"
$cairn --json --cache-dir "$run/cache" disk serve cairn-guest \
    --socket "$run/blk.sock" --overlay "$run/overlay" >"$run/out" &
serve_pid=$!
exec 3<"$run/out"
read -r ready <&3
echo "$ready"
start=$(date +%s.%N)
timeout 180 qemu-system-x86_64 -accel tcg -m 512 -smp 1 -nographic -no-reboot -net none \
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
    -chardev socket,id=c0,path="$run/blk.sock" \
    -device vhost-user-blk-pci,chardev=c0,num-queues=1 \
    -kernel "$guest/vmlinuz" -initrd "$guest/initramfs.cpio.gz" \
    -append "console=ttyS0 quiet panic=-1 cairn.test=boot" 2>/dev/null |
    while IFS= read -r line; do
        case "$line" in
        *CAIRN-INIT*)
            echo "guest init after $(echo "$(date +%s.%N) - $start" | bc | cut -c1-5) s (QEMU start to /init; ${line#*CAIRN-INIT })"
            ;;
        *CAIRN-*) echo "${line#*CAIRN-}" ;;
        esac
    done
end=$(date +%s.%N)
kill -TERM "$serve_pid"
read -r stopped <&3
wait "$serve_pid" || true
fetched=$(echo "$stopped" | sed -n 's/.*"remote_bytes":\([0-9]*\).*/\1/p')
echo "== result"
echo "QEMU start to power-off: $(echo "$end - $start" | bc | cut -c1-5) s"
echo "read from the store: $fetched bytes: $(echo "scale=1; $fetched * 100 / $stored" | bc)% of the $stored bytes the store holds of the image ($(echo "scale=1; $fetched * 100 / $size" | bc)% of its $size bytes logical size)"
