#!/usr/bin/env python3
"""The OCI import benchmark's images, as OCI layouts (reproducible).

    benches/oci-bench-image.py OUT_DIR [BASE_LAYOUT]

OUT_DIR/bench       BASE's layers (if given, e.g. debian-minimal) then three
                    layers of generated files: 200, 60 and 12 MiB (half text-like,
                    half random, a few hundred files of many sizes).
OUT_DIR/bench-plus  the same plus one layer of PLUS_MIB (default 32) MiB of new files.
"""

import hashlib
import json
import os
import random
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures"))
import importlib.util  # noqa: E402

spec = importlib.util.spec_from_file_location(
    "fx", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "build-oci-layouts.py"))
fx = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fx)

VERSION = "2"
WORDS = [w.encode() for w in "the of and to in is that for it as with was on be by this are from at or an "
         "which have not but were they his all can their has one more will if when there so what about "
         "library module kernel config package python import return value error".split()]


def text_bytes(rng, n):
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(WORDS) for _ in range(16)) + b"\n"
    return bytes(out[:n])


def files_layer(seed, mib, prefix):
    rng = random.Random(seed)
    l = fx.Layer()
    l.dir(prefix)
    total, i = 0, 0
    budget = mib << 20
    while total < budget:
        size = min(rng.choice([2_000, 15_000, 60_000, 250_000, 1_000_000, 4_000_000]), budget - total)
        d = "%s/d%02d" % (prefix, i // 40)
        if i % 40 == 0:
            l.dir(d)
        data = text_bytes(rng, size) if i % 2 == 0 else rng.randbytes(size)
        l.add("%s/f%05d" % (d, i), data=data, mode=0o644 if i % 7 else 0o755)
        total += size
        i += 1
    return l.bytes()


def base_layers(base):
    """(uncompressed tar, compressed blob, media type) of each layer of an OCI layout."""
    if not base:
        return []
    idx = json.load(open(os.path.join(base, "index.json")))
    m = json.load(open(os.path.join(base, "blobs", "sha256", idx["manifests"][0]["digest"][7:])))
    c = json.load(open(os.path.join(base, "blobs", "sha256", m["config"]["digest"][7:])))
    out = []
    for d, diff in zip(m["layers"], c["rootfs"]["diff_ids"]):
        out.append((open(os.path.join(base, "blobs", "sha256", d["digest"][7:]), "rb").read(), d["mediaType"], diff))
    return out


def write(layout, base, layers):
    """Like fixtures' write_layout, but base layers go in as they are."""
    if os.path.exists(layout):
        shutil.rmtree(layout)
    os.makedirs(layout)
    descs, diff_ids = [], []
    for blob_bytes, media_type, diff_id in base:
        descs.append(fx.blob(layout, blob_bytes, media_type))
        diff_ids.append(diff_id)
    for data in layers:
        descs.append(fx.blob(layout, fx.gz(data), "application/vnd.oci.image.layer.v1.tar+gzip"))
        diff_ids.append("sha256:" + hashlib.sha256(data).hexdigest())
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    c = fx.blob(layout, json.dumps(config, sort_keys=True).encode(), "application/vnd.oci.image.config.v1+json")
    m = fx.blob(layout, json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                    "config": c, "layers": descs}, sort_keys=True).encode(),
                "application/vnd.oci.image.manifest.v1+json")
    m["annotations"] = {"org.opencontainers.image.ref.name": "latest"}
    json.dump({"schemaVersion": 2, "manifests": [m]}, open(os.path.join(layout, "index.json"), "w"))
    json.dump({"imageLayoutVersion": "1.0.0"}, open(os.path.join(layout, "oci-layout"), "w"))


def main():
    out = os.path.abspath(sys.argv[1])
    base = sys.argv[2] if len(sys.argv) > 2 else ""
    plus_mib = int(os.environ.get("PLUS_MIB", "32"))
    stamp = os.path.join(out, "stamp")
    want = "%s %s %d" % (VERSION, base, plus_mib)
    if os.path.exists(stamp) and open(stamp).read() == want:
        print(out)
        return
    os.makedirs(out, exist_ok=True)
    b = base_layers(base)
    own = [files_layer(1, 200, "opt/big"), files_layer(2, 60, "usr/share/mid"), files_layer(3, 12, "srv/small")]
    write(os.path.join(out, "bench"), b, own)
    write(os.path.join(out, "bench-plus"), b, own + [files_layer(4, plus_mib, "opt/plus")])
    open(stamp, "w").write(want)
    print(out)


if __name__ == "__main__":
    main()
