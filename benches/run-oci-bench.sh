#!/usr/bin/env bash
# The OCI import benchmark, one run (figures in README, "Images from OCI images
# and Dockerfiles"). On a fresh machine: installs what it needs, builds the
# images (debian-minimal + 272 MiB of generated files in 3 layers, and the same
# plus one 32 MiB layer), pushes them to the local registry, then measures:
#   1. end to end, median of ROUNDS alternating rounds:
#      cairn image import docker://...   against
#      skopeo copy docker://... oci:DIR + umoci unpack + mke2fs -t ext4 -d
#      (the same disk size cairn chose, page cache warm for both);
#   2. a re-import: new bytes stored;
#   3. the image with one more layer of N MiB: new bytes against N;
#   4. a Dockerfile of 3 RUN steps: a rebuild with no change (seconds, steps
#      run) and with its last RUN changed (steps run).
# Writes target/bench/oci.json. ROUNDS (default 3), PLUS_MIB (default 32).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/dev/setup.sh >&2
export PATH="$HOME/.cargo/bin:$PATH"
rounds=${ROUNDS:-3}
export PLUS_MIB=${PLUS_MIB:-32}
cargo build --release --workspace --bins >&2
cairn=$PWD/target/release/cairn
base=$(fixtures/build-debian-minimal.sh)
images=$(python3 benches/oci-bench-image.py target/bench/oci-images "$base")
eval "$(tools/dev/registry-server.sh start)"
reg=$CAIRN_TEST_REGISTRY
for n in bench bench-plus; do
    skopeo copy -q --dest-tls-verify=false "oci:$images/$n:latest" "docker://$reg/bench/$n:latest" >&2
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

cairn_import() { # STORE NAME REF -> JSON on stdout
    "$cairn" --store "file://$work/$1" --cache-dir "$work/$1.cache" --json image import --insecure \
        --name "$2" "$3"
}

: >"$work/cairn.t"; : >"$work/pipe.t"
size=0
for r in $(seq "$rounds"); do
    for who in cairn pipe; do
        [ $((r % 2)) = 0 ] && who=$([ "$who" = cairn ] && echo pipe || echo cairn)
        # Only the pipeline's outputs: store s1 must keep cairn's first import
        # for the re-import below.
        rm -rf "$work/oci" "$work/bundle" "$work/disk.img"
        sync
        t0=$(now)
        if [ "$who" = cairn ]; then
            rm -rf "$work/s$r" "$work/s$r.cache"
            sync
            t0=$(now)
            out=$(cairn_import "s$r" bench "docker://$reg/bench/bench:latest")
            t1=$(now)
            size=$(echo "$out" | python3 -c 'import json,sys; print(json.load(sys.stdin)["logical_bytes"])')
            awk "BEGIN {print $t1 - $t0}" >>"$work/cairn.t"
        else
            skopeo copy -q --src-tls-verify=false "docker://$reg/bench/bench:latest" "oci:$work/oci:latest"
            umoci unpack --image "$work/oci:latest" "$work/bundle" >/dev/null
            mke2fs -q -t ext4 -d "$work/bundle/rootfs" "$work/disk.img" "$((${size:-0} > 0 ? size / 1024 : 2097152))k"
            t1=$(now)
            awk "BEGIN {print $t1 - $t0}" >>"$work/pipe.t"
        fi
    done
done
c=$(median <"$work/cairn.t"); p=$(median <"$work/pipe.t")

# Re-import, and the image with one more layer, into the first store.
again=$(cairn_import s1 again "docker://$reg/bench/bench:latest")
plus=$(cairn_import s1 plus "docker://$reg/bench/bench-plus:latest")

# A Dockerfile of three RUN steps over the bench image.
ctx="$work/ctx"; mkdir -p "$ctx"
dockerfile() {
    printf 'FROM oci:%s/bench:latest\nRUN dd if=/dev/urandom of=/opt/a bs=1M count=8 2>/dev/null\nRUN echo two > /opt/b\nRUN echo %s > /opt/c\n' \
        "$images" "$1" >"$ctx/Dockerfile"
}
build() { "$cairn" --store "file://$work/s1" --cache-dir "$work/s1.cache" --json image build "$ctx" --name built --replace; }
dockerfile three; build >/dev/null
t0=$(now); rebuild=$(build); t1=$(now); rebuild_s=$(awk "BEGIN {print $t1 - $t0}")
dockerfile changed; changed=$(build)

mkdir -p target/bench
python3 - "$c" "$p" "$again" "$plus" "$rebuild_s" "$rebuild" "$changed" "$PLUS_MIB" <<'EOF' | tee target/bench/oci.json >&2
import json, sys
c, p, again, plus, rebuild_s, rebuild, changed, plus_mib = sys.argv[1:]
again, plus, rebuild, changed = map(json.loads, (again, plus, rebuild, changed))
n = int(plus_mib) << 20
out = {
    "import_seconds_cairn": float(c), "import_seconds_pipeline": float(p),
    "import_ratio": float(c) / float(p),
    "reimport_new_bytes": again["new_bytes"],
    "plus_layer_bytes": n, "plus_new_bytes": plus["new_bytes"], "plus_ratio": plus["new_bytes"] / n,
    "rebuild_seconds": float(rebuild_s), "rebuild_steps_run": rebuild["steps_run"],
    "changed_last_run_steps_run": changed["steps_run"], "steps": changed["steps"],
}
print(json.dumps(out, indent=1))
print(f"""
import, end to end (median of rounds): cairn {out['import_seconds_cairn']:.2f} s, skopeo + umoci + mke2fs -d {out['import_seconds_pipeline']:.2f} s: {out['import_ratio']:.2f}x (target <= 1.0x)
re-import: {out['reimport_new_bytes']} new bytes (target 0)
one more layer of {n >> 20} MiB: {out['plus_new_bytes'] / 2**20:.1f} MiB new, {out['plus_ratio']:.2f}x (target <= 1.5x)
Dockerfile rebuild, no change: {out['rebuild_seconds']:.2f} s, {out['rebuild_steps_run']} steps run (target < 1 s)
last RUN changed: {out['changed_last_run_steps_run']} of {out['steps']} steps run (target 1)""", file=sys.stderr)
EOF
