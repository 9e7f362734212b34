//! Hostile images: each is refused with an error that says what and
//! where, or (where a runtime would accept it) lands inside the image;
//! nothing is ever written outside the image, and the staging directory is
//! left empty. Layers are crafted byte by byte here (the tar crate's
//! builder refuses most of these paths).

#[path = "oci/support.rs"]
mod support;

use std::io::Write;
use std::path::Path;

use cairn_engine::oci::layer::Limits;
use cairn_engine::oci::OciError;
use cairn_engine::ErrorKind;
use sha2::{Digest, Sha256};
use support::*;

const TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";

/// A tar built entry by entry, names written raw.
struct Tar(Vec<u8>);

impl Tar {
    fn new() -> Tar {
        Tar(Vec::new())
    }

    fn raw(
        &mut self,
        name: &[u8],
        kind: u8,
        data: &[u8],
        link: &[u8],
        size: Option<u64>,
    ) -> &mut Tar {
        let mut h = tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_mode(if kind == b'5' { 0o755 } else { 0o644 });
        h.set_size(size.unwrap_or(data.len() as u64));
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        h.set_cksum();
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(512), 0);
        self
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Tar {
        self.raw(name.as_bytes(), b'0', data, b"", None)
    }
    fn dir(&mut self, name: &str) -> &mut Tar {
        self.raw(name.as_bytes(), b'5', b"", b"", None)
    }
    fn symlink(&mut self, name: &str, target: &str) -> &mut Tar {
        self.raw(name.as_bytes(), b'2', b"", target.as_bytes(), None)
    }
    fn hardlink(&mut self, name: &str, target: &str) -> &mut Tar {
        self.raw(name.as_bytes(), b'1', b"", target.as_bytes(), None)
    }
    /// A PAX header of `records` for the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Tar {
        let mut body = Vec::new();
        for (k, v) in records {
            let rest = k.len() + v.len() + 3;
            let mut len = rest + rest.to_string().len();
            if (len).to_string().len() != rest.to_string().len() {
                len += 1;
            }
            body.extend_from_slice(format!("{len} {k}=").as_bytes());
            body.extend_from_slice(v);
            body.push(b'\n');
        }
        self.raw(b"PaxHeader", b'x', &body, b"", None)
    }
    fn done(&mut self) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.0);
        v.extend_from_slice(&[0u8; 1024]);
        v
    }
}

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

fn gz(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// One layer as the manifest describes it.
struct Layer {
    blob: Vec<u8>,
    media_type: &'static str,
    diff_id: String,
    /// What the descriptor claims, when it lies.
    size: Option<u64>,
    digest: Option<String>,
}

fn layer(tar: Vec<u8>, media_type: &'static str) -> Layer {
    let blob = match media_type {
        GZIP => gz(&tar),
        ZSTD => zstd::encode_all(&tar[..], 1).unwrap(),
        _ => tar.clone(),
    };
    Layer {
        blob,
        media_type,
        diff_id: sha(&tar),
        size: None,
        digest: None,
    }
}

fn write_blob(dir: &Path, bytes: &[u8]) -> String {
    write_blob_as(dir, bytes, sha(bytes))
}

/// Stores `bytes` under digest `d`, whether or not they hash to it.
fn write_blob_as(dir: &Path, bytes: &[u8], d: String) -> String {
    let p = dir.join("blobs/sha256").join(&d[7..]);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
    d
}

/// An OCI layout of `layers`, tagged `latest`; its reference.
fn write_layout(dir: &Path, layers: &[Layer]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let mut descs = Vec::new();
    for l in layers {
        let d = match &l.digest {
            Some(claimed) => write_blob_as(dir, &l.blob, claimed.clone()),
            None => write_blob(dir, &l.blob),
        };
        descs.push(serde_json::json!({
            "mediaType": l.media_type,
            "digest": d,
            "size": l.size.unwrap_or(l.blob.len() as u64),
        }));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux", "config": {},
        "rootfs": {"type": "layers", "diff_ids": layers.iter().map(|l| l.diff_id.clone()).collect::<Vec<_>>()},
    });
    let cbytes = serde_json::to_vec(&config).unwrap();
    let cd = write_blob(dir, &cbytes);
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cbytes.len()},
        "layers": descs,
    });
    let mbytes = serde_json::to_vec(&manifest).unwrap();
    let md = write_blob(dir, &mbytes);
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": mbytes.len(),
        "annotations": {"org.opencontainers.image.ref.name": "latest"}}]});
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    format!("oci:{}:latest", dir.display())
}

/// A name no test run has used, for paths that must never appear on the host.
fn sentinel() -> String {
    format!("cairn-escape-{:016x}", fastrand::u64(..))
}

fn refused(s: &Store, layers: Vec<Layer>, limits: Option<Limits>) -> OciError {
    let r = write_layout(
        &s.dir.path().join(format!("l{}", fastrand::u32(..))),
        &layers,
    );
    let mut opts = s.options();
    if let Some(l) = limits {
        opts.limits = l;
    }
    let e = s
        .import_with(&r, &opts)
        .expect_err("a hostile image was accepted");
    assert!(
        s.staging_leftovers().is_empty(),
        "{:?}",
        s.staging_leftovers()
    );
    e
}

fn msg(e: &OciError) -> String {
    cairn_engine::error::DisplayChain(e).to_string()
}

#[test]
fn dotdot_and_absolute_entries_are_refused() {
    let s = Store::new();
    let name = sentinel();
    for path in [
        format!("../{name}"),
        format!("a/../../{name}"),
        format!("/tmp/{name}"),
    ] {
        let e = refused(
            &s,
            vec![layer(Tar::new().file(&path, b"x").done(), TAR)],
            None,
        );
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{}", msg(&e));
        assert!(msg(&e).contains(&path), "{}", msg(&e));
    }
    assert!(!Path::new("/tmp").join(&name).exists());
    assert!(!s.dir.path().parent().unwrap().join(&name).exists());
}

#[test]
fn a_symlink_named_dot_cannot_replace_the_root() {
    // umoci CVE-2021-29136: a symlink `.` redirected later writes.
    let s = Store::new();
    let e = refused(
        &s,
        vec![layer(
            Tar::new().symlink(".", "/tmp").file("x", b"x").done(),
            TAR,
        )],
        None,
    );
    assert!(msg(&e).contains("root"), "{}", msg(&e));
}

#[test]
fn writes_through_symlinks_stay_inside_the_image() {
    let s = Store::new();
    let (a, b, c) = (sentinel(), sentinel(), sentinel());
    let tar = Tar::new()
        .symlink("rel", &format!("../../../../../../tmp/{a}"))
        .file("rel/pwned", b"1")
        .symlink("abs", &format!("/tmp/{b}"))
        .file("abs/pwned", b"2")
        // tar-rs #442: a symlink, then a directory at the same path.
        .symlink("d", &format!("/tmp/{c}"))
        .dir("d")
        .file("d/f", b"3")
        .done();
    let r = write_layout(&s.dir.path().join("l"), &[layer(tar, GZIP)]);
    let imp = s.import(&r).unwrap();
    for n in [&a, &b, &c] {
        assert!(!Path::new("/tmp").join(n).exists(), "/tmp/{n} was written");
    }
    let img = s.export(&imp, "disk");
    e2fsck(&img);
    let t = ext4_tree(&img);
    assert_eq!(t[&format!("/tmp/{a}/pwned")].size, 1);
    assert_eq!(t[&format!("/tmp/{b}/pwned")].size, 1);
    assert_eq!(t["/d"].kind, 'd');
    assert_eq!(t["/d/f"].size, 1);
    assert!(!t.contains_key(&format!("/tmp/{c}")));
}

#[test]
fn hard_links_out_of_the_root_are_refused() {
    let s = Store::new();
    for target in ["../../etc/passwd", "/etc/passwd", "missing"] {
        let e = refused(
            &s,
            vec![layer(
                Tar::new().file("f", b"x").hardlink("h", target).done(),
                TAR,
            )],
            None,
        );
        assert!(msg(&e).contains(target), "{}", msg(&e));
    }
}

#[test]
fn whiteouts_naming_dot_dot_or_outside_are_refused() {
    let s = Store::new();
    for path in [".wh...", "d/.wh..", "../.wh.x", ".wh."] {
        let base = layer(Tar::new().dir("d").file("d/f", b"x").done(), TAR);
        let e = refused(
            &s,
            vec![base, layer(Tar::new().file(path, b"").done(), TAR)],
            None,
        );
        assert!(msg(&e).contains(path), "{path}: {}", msg(&e));
    }
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused() {
    let s = Store::new();
    let mut l = layer(Tar::new().file("f", b"hello").done(), TAR);
    l.digest = Some(sha(b"something else"));
    let e = refused(&s, vec![l], None);
    assert!(matches!(e, OciError::Digest { .. }), "{}", msg(&e));
    // The config's diff_id must match the uncompressed bytes too.
    let mut l = layer(Tar::new().file("f", b"hello").done(), GZIP);
    l.diff_id = sha(b"not this");
    let e = refused(&s, vec![l], None);
    assert!(msg(&e).contains("diff_id"), "{}", msg(&e));
}

#[test]
fn truncated_and_oversized_blobs_are_refused() {
    let s = Store::new();
    let big: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    let mut l = layer(Tar::new().file("f", &big).done(), GZIP);
    let full = l.blob.len() as u64;
    l.blob.truncate(l.blob.len() / 2);
    l.size = Some(full);
    let e = refused(&s, vec![l], None);
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{}", msg(&e));

    // Far more bytes than the descriptor says.
    let mut l = layer(Tar::new().file("f", &big).done(), GZIP);
    l.size = Some(1000);
    let e = refused(&s, vec![l], None);
    assert!(msg(&e).contains("1000"), "{}", msg(&e));
}

#[test]
fn decompression_bombs_hit_the_byte_caps() {
    let s = Store::new();
    // 64 MiB of zeros, a few KiB of zstd; the cap here is 8 MiB.
    let zeros = vec![0u8; 64 << 20];
    let limits = Limits {
        max_bytes: 8 << 20,
        ..Limits::default()
    };
    let e = refused(
        &s,
        vec![layer(Tar::new().file("z", &zeros).done(), ZSTD)],
        Some(limits.clone()),
    );
    assert!(matches!(e, OciError::Limit { .. }), "{}", msg(&e));
    // Many small entries that add up past the cap.
    let mut t = Tar::new();
    for i in 0..40 {
        t.file(&format!("f{i}"), &zeros[..256 << 10]);
    }
    let e = refused(&s, vec![layer(t.done(), GZIP)], Some(limits));
    assert!(matches!(e, OciError::Limit { .. }), "{}", msg(&e));
    // A header claiming 100 GiB is refused before anything is read, at the default cap.
    let t = Tar::new()
        .raw(b"huge", b'0', b"tiny", b"", Some(100 << 30))
        .done();
    let e = refused(&s, vec![layer(t, TAR)], None);
    assert!(
        msg(&e).contains("huge") && msg(&e).contains("limit"),
        "{}",
        msg(&e)
    );
}

#[test]
fn entries_path_lengths_and_pax_records_are_capped() {
    let s = Store::new();
    let mut t = Tar::new();
    for i in 0..20 {
        t.file(&format!("f{i}"), b"x");
    }
    let limits = Limits {
        max_entries: 10,
        ..Limits::default()
    };
    let e = refused(&s, vec![layer(t.done(), TAR)], Some(limits));
    assert!(msg(&e).contains("entries"), "{}", msg(&e));

    let long = "a/".repeat(2500) + "f";
    let t = Tar::new()
        .pax(&[("path", long.as_bytes())])
        .file("short", b"x")
        .done();
    let e = refused(&s, vec![layer(t, TAR)], None);
    assert!(msg(&e).contains("longer than 4096"), "{}", msg(&e));

    let huge = vec![b'x'; 2 << 20];
    let t = Tar::new().pax(&[("comment", &huge)]).file("f", b"x").done();
    let e = refused(&s, vec![layer(t, GZIP)], None);
    assert!(msg(&e).contains("extension header"), "{}", msg(&e));
}

#[test]
fn unsupported_media_types_are_refused() {
    let s = Store::new();
    let mut l = layer(Tar::new().file("f", b"x").done(), TAR);
    l.media_type = "application/vnd.example.not-a-layer";
    let e = refused(&s, vec![l], None);
    assert_eq!(e.kind(), ErrorKind::Unsupported, "{}", msg(&e));
    assert!(msg(&e).contains("vnd.example.not-a-layer"), "{}", msg(&e));
}
