//! OCI import against real inputs: the fixture layouts (multi-layer with
//! every special entry), a docker archive of the same image, images that
//! share a base; the disk checked by e2fsck and read back by debugfs, and
//! compared with `umoci unpack` of the same image.

#[path = "oci/support.rs"]
mod support;

use std::process::Command;

use support::*;

#[test]
fn multi_layer_image_matches_umoci_unpack() {
    let s = Store::new();
    let imp = s.import(&layout("multi")).unwrap();
    assert!(
        s.staging_leftovers().is_empty(),
        "{:?}",
        s.staging_leftovers()
    );
    let img = s.export(&imp, "multi.ext4");
    e2fsck(&img);
    let ours = ext4_tree(&img);

    let bundle = s.dir.path().join("bundle");
    let out = Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", fixtures().join("multi-gz").display()))
        .arg(&bundle)
        .output()
        .expect("umoci (tools/dev/setup.sh installs it)");
    assert!(
        out.status.success(),
        "umoci: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = host_tree(&bundle.join("rootfs"));

    let (a, b) = (without_inos(&ours), without_inos(&theirs));
    for (p, e) in &b {
        assert_eq!(
            a.get(p),
            Some(e),
            "{p}: cairn's disk differs from umoci's tree"
        );
    }
    let extra: Vec<&String> = a.keys().filter(|p| !b.contains_key(*p)).collect();
    assert!(extra.is_empty(), "only in cairn's disk: {extra:?}");
    assert_eq!(link_groups(&ours), link_groups(&theirs));

    // What the fixture was built to exercise, stated outright.
    let get = |p: &str| ours.get(p).unwrap_or_else(|| panic!("{p} missing"));
    assert!(!ours.contains_key("/etc/to-delete") && !ours.contains_key("/etc/dir-to-delete"));
    assert!(!ours.contains_key("/opaque/x") && ours.contains_key("/opaque/z"));
    assert_eq!(get("/usr/bin/ping-link").ino, get("/usr/bin/ping").ino);
    assert_eq!(get("/usr/bin/tool-link2").ino, get("/usr/bin/tool").ino);
    let cap = &get("/usr/bin/ping").xattrs["security.capability"];
    assert_eq!(cap.len(), 20);
    assert_eq!(get("/usr/bin/tool").mode, 0o4755);
    assert_eq!(get("/usr/bin/wall").mode, 0o2755);
    assert_eq!(get("/tmp").mode, 0o1777);
    assert_eq!(get("/var").mode, 0o700);
    assert_eq!(get("/dev/null").dev, (1, 3));
    assert_eq!(get("/dev/big").dev, (300, 70000));
    assert_eq!(get("/var/fifo").kind, 'p');
    assert!(ours.contains_key("/usr/lib/through-symlink.so"));
    assert_eq!(get("/lib").link, "usr/lib");
    assert!(get("/usr/share/longlink").link.len() > 60);
    assert!(!ours.contains_key("/srv/data/old") && ours.contains_key("/srv/data/new"));
    assert_eq!(get("/home-user-file").uid, 1000);
    assert_eq!(imp.meta.config.working_dir.as_deref(), Some("/srv"));
    assert_eq!(imp.meta.source.layers.len(), 3);

    // The same layers, compressed otherwise: the same disk.
    let gz = s.import(&layout("multi-gz")).unwrap();
    assert_eq!(gz.manifest.chunks, imp.manifest.chunks);
}

#[test]
fn reimport_stores_nothing_and_gives_the_same_image() {
    let s = Store::new();
    let first = s.import(&layout("multi")).unwrap();
    assert!(first.report.new_bytes > 0);
    let again = s.import(&layout("multi")).unwrap();
    assert_eq!(again.report.new_bytes, 0);
    assert_eq!(again.report.new_chunks, 0);
    assert_eq!(
        again.report.id, first.report.id,
        "same image, same disk, same manifest"
    );
}

#[test]
fn docker_archive_gives_the_same_disk_as_the_layout() {
    let s = Store::new();
    let from_layout = s.import(&layout("multi")).unwrap();
    let archive = format!(
        "docker-archive:{}",
        fixtures().join("multi.docker.tar").display()
    );
    let from_archive = s.import(&archive).unwrap();
    assert_eq!(from_archive.manifest.chunks, from_layout.manifest.chunks);
    assert_eq!(from_archive.report.new_bytes, 0);
    assert_eq!(from_archive.default_name.as_deref(), Some("multi"));
    assert_eq!(from_archive.meta.config, from_layout.meta.config);
}

#[test]
fn an_image_on_a_shared_base_stores_little_more_than_its_layer() {
    let s = Store::new();
    let base = s.import(&layout("base")).unwrap();
    let plus = s.import(&layout("base-plus")).unwrap();
    let layer = 8 * 512 * 1024u64; // what `plus_layer` adds
    eprintln!(
        "base: {} new bytes; base-plus: {} new bytes for a {} byte layer ({:.2}x)",
        base.report.new_bytes,
        plus.report.new_bytes,
        layer,
        plus.report.new_bytes as f64 / layer as f64
    );
    assert!(
        plus.report.new_bytes as f64 <= 1.5 * layer as f64,
        "{} new bytes for a {layer}-byte layer",
        plus.report.new_bytes
    );
    let img = s.export(&plus, "plus.ext4");
    e2fsck(&img);
}
