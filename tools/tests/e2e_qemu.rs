//! End to end: QEMU (TCG) boots a Debian kernel whose root disk is served
//! by `cairn disk serve` from an image whose chunks are only in the S3
//! server. Needs the guest fixture (`fixtures/build-guest.sh`, path in
//! CAIRN_GUEST_DIR or fixtures/out/guest), qemu-system-x86 and the S3 server
//! (tools/dev/s3-server.sh); `tools/dev/test.sh` provides all three. Fails
//! loudly when any is missing.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::qemu::{field, guest_dir, Guest, BOOT};

struct Env {
    dir: tempfile::TempDir,
    store: String,
    guest: PathBuf,
}

impl Env {
    /// The guest rootfs imported into a fresh bucket on the S3 server.
    fn new(tag: &str) -> Env {
        let endpoint = std::env::var("CAIRN_TEST_S3_ENDPOINT")
            .expect("CAIRN_TEST_S3_ENDPOINT is not set: start tools/dev/s3-server.sh");
        let dir = tempfile::tempdir().unwrap();
        let bucket = format!("e2e-{tag}-{:08x}", fastrand::u32(..));
        let store = format!("s3://{bucket}/img?endpoint={endpoint}");
        let env = Env {
            dir,
            store,
            guest: guest_dir(),
        };
        common::run_ok(
            env.cairn("import-cache")
                .args(["--json", "image", "import-raw", "--name", "guest"])
                .arg(env.guest.join("rootfs.ext4")),
        );
        env
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cairn(&self, cache: &str) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.args(["--store", &self.store, "--cache-dir"])
            .arg(self.path(cache))
            .args(["--cache-size", "256M"]);
        c
    }

    /// `cairn disk serve` of `guest` on the overlay `overlay`, with cache `cache`.
    fn serve(&self, cache: &str, overlay: &str) -> Server {
        self.serve_image("guest", cache, overlay)
    }

    fn serve_image(&self, image: &str, cache: &str, overlay: &str) -> Server {
        let socket = self.path("blk.sock");
        let mut child = self
            .cairn(cache)
            .args(["--json", "disk", "serve", image, "--socket"])
            .arg(&socket)
            .arg("--overlay")
            .arg(self.path(overlay))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.contains("\"ready\":true"), "not ready: {line:?}");
        Server {
            child,
            socket,
            stdout,
        }
    }

    /// Boots the guest with `cairn.test=job`; its console lines arrive on
    /// the returned guest.
    fn boot(&self, socket: &Path, job: &str) -> Guest {
        Guest::start(
            job,
            common::qemu_guest(&self.guest, socket, &format!("cairn.test={job}")),
        )
    }
}

struct Server {
    child: Child,
    socket: PathBuf,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Server {
    /// SIGTERM; returns the JSON the server printed on its way out.
    fn stop(mut self) -> serde_json::Value {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        assert!(self.child.wait().unwrap().success());
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line:?}"))
    }

    fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn boots_lazily_from_s3_and_fsynced_files_survive_a_second_boot() {
    let env = Env::new("boot");
    // Cold: an empty cache, every byte from the S3 server.
    let server = env.serve("cold-cache", "overlay");
    let mut guest = env.boot(&server.socket, "write");
    let written = guest.expect("CAIRN-WRITE-OK", BOOT);
    guest.finish();
    let stopped = server.stop();
    let fetched = stopped["remote_bytes"].as_u64().unwrap();
    let image = std::fs::metadata(env.guest.join("rootfs.ext4"))
        .unwrap()
        .len();
    // Laziness against what the store holds of the image (its frames,
    // compressed, zero chunks not stored at all), not its logical size.
    let described = common::run_ok(
        env.cairn("import-cache")
            .args(["--json", "image", "describe", "guest"]),
    );
    let described: serde_json::Value = serde_json::from_slice(&described.stdout).unwrap();
    let stored = described["stored_bytes"].as_u64().unwrap();
    assert!(stored > 0 && stored < image, "{described}");
    assert!(fetched > 0, "a cold boot must fetch from the store");
    assert!(
        fetched < stored,
        "a lazy boot fetches less than the image's stored bytes: {fetched} of {stored}"
    );
    println!(
        "cold boot fetched {fetched} of the image's {stored} stored bytes ({:.1}%; {image} logical)",
        fetched as f64 * 100.0 / stored as f64
    );

    // Second boot on the same overlay: the files are there, intact.
    let server = env.serve("cold-cache", "overlay");
    let mut guest = env.boot(&server.socket, "check");
    let check = guest.expect("CAIRN-CHECK", BOOT);
    guest.finish();
    assert_eq!(field(&check, "ok"), "1", "{check}");
    assert_eq!(field(&check, "files"), "8", "{check}");
    assert_eq!(field(&check, "payload"), field(&written, "payload"));
    server.stop();

    // Fold the overlay into a snapshot: few new chunks; it boots on a fresh
    // overlay with the files in it; its exported bytes pass e2fsck.
    let out = common::run_ok(
        env.cairn("cold-cache")
            .args(["--json", "disk", "snapshot", "--overlay"])
            .arg(env.path("overlay"))
            .args(["--name", "snap"]),
    );
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (new, all) = (
        snap["new_chunks"].as_u64().unwrap(),
        snap["chunks"].as_u64().unwrap(),
    );
    assert!(
        new > 0 && new * 10 < all,
        "{new} new chunks of {all}: {snap}"
    );
    let server = env.serve_image("snap", "cold-cache", "snap-overlay");
    let mut guest = env.boot(&server.socket, "check");
    let check = guest.expect("CAIRN-CHECK", BOOT);
    guest.finish();
    assert_eq!(field(&check, "ok"), "1", "{check}");
    assert_eq!(field(&check, "files"), "8", "{check}");
    server.stop();
    let raw = env.path("snap.raw");
    common::run_ok(
        env.cairn("cold-cache")
            .args(["image", "export", "snap"])
            .arg(&raw),
    );
    // e2fsck -fn on the exported snapshot: clean.
    common::run_ok(Command::new("e2fsck").arg("-fn").arg(&raw));
}

#[test]
fn kill_9_of_the_backend_loses_no_fsynced_write() {
    let env = Env::new("kill9");
    let server = env.serve("cache", "overlay");
    let mut guest = env.boot(&server.socket, "stress");
    let mut last = 0u32;
    while last < 6 {
        let line = guest.expect("CAIRN-FSYNCED", BOOT);
        last = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    }
    server.kill_9();
    drop(guest);

    let server = env.serve("cache", "overlay");
    let mut guest = env.boot(&server.socket, "check");
    let check = guest.expect("CAIRN-CHECK", BOOT);
    guest.finish();
    assert_eq!(field(&check, "ok"), "1", "{check}");
    let files: u32 = field(&check, "files").parse().unwrap();
    assert!(
        files >= last,
        "{files} files survived, {last} were fsynced: {check}"
    );
    server.stop();
}
