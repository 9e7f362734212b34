//! `cairn disk serve` driven by a real vhost-user-blk client (libblkio, the
//! library QEMU and fio use), on a `file://` store: reads match the image,
//! writes survive SIGTERM and kill -9 once flushed, partial blocks are
//! refused, write-zeroes and discard read back zeros, read-only refuses writes, queues are honoured.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use blkio::Blkio;
use cairn_benches::blk_client::Client;

const MIB: usize = 1 << 20;

struct Env {
    dir: tempfile::TempDir,
    store: String,
    image: Vec<u8>,
}

impl Env {
    /// A 24 MiB image (random, text and zero stretches) imported as `base`.
    fn new() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("file://{}", dir.path().join("store").display());
        let mut rng = fastrand::Rng::with_seed(5);
        let mut image = Vec::with_capacity(24 * MIB);
        for i in 0..24 {
            match i % 3 {
                0 => image.extend((0..MIB).map(|_| rng.u8(..))),
                1 => image.extend((0..MIB).map(|j| b"cairn lazy disk "[j % 16])),
                _ => image.extend(std::iter::repeat_n(0u8, MIB)),
            }
        }
        let env = Env { dir, store, image };
        std::fs::write(env.path("image.raw"), &env.image).unwrap();
        common::run_ok(
            env.cairn()
                .args(["image", "import-raw", "--name", "base"])
                .arg(env.path("image.raw")),
        );
        env
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cairn(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_cairn"));
        c.args(["--store", &self.store, "--cache-dir"])
            .arg(self.path("cache"))
            .args(["--cache-size", "256M"]);
        c
    }

    /// Starts `cairn disk serve` and waits for its ready line.
    fn serve(&self, extra: &[&str]) -> Server {
        let socket = self.path("blk.sock");
        let mut child = self
            .cairn()
            .args(["--json", "disk", "serve", "base", "--socket"])
            .arg(&socket)
            .arg("--overlay")
            .arg(self.path("overlay"))
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let ready: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("ready line is not JSON ({e}): {line:?}"));
        assert_eq!(ready["ready"], true, "{line}");
        Server {
            child,
            socket,
            stdout,
        }
    }
}

struct Server {
    child: Child,
    socket: PathBuf,
    stdout: BufReader<std::process::ChildStdout>,
}

impl Server {
    fn signal(&mut self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
        let status = self.child.wait().unwrap();
        if sig == "-TERM" {
            assert!(status.success(), "serve exited with {status} on SIGTERM");
            let mut line = String::new();
            self.stdout.read_line(&mut line).unwrap();
            let stopped: serde_json::Value = serde_json::from_str(&line).unwrap();
            assert_eq!(stopped["stopped"], true, "{line}");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The shared libblkio client (`cairn_benches::blk_client`), connected
/// with `queues` queues.
fn connect(socket: &Path, queues: usize) -> Client {
    Client::connect_with(socket, queues, false).unwrap()
}

#[test]
fn reads_match_the_image_and_flushed_writes_survive_sigterm_and_kill_9() {
    let env = Env::new();
    let mut server = env.serve(&["--queues", "2"]);
    let mut c = connect(&server.socket, 2);
    assert_eq!(c.capacity(), env.image.len() as u64);
    assert_eq!(c.queues(), 2);

    // 4 KiB random reads and 128 KiB sequential reads, all served lazily.
    let mut rng = fastrand::Rng::with_seed(9);
    for _ in 0..200 {
        let off = rng.usize(..env.image.len() / 4096) * 4096;
        assert!(c.read(off as u64, 4096).unwrap() == env.image[off..off + 4096]);
    }
    for off in (0..env.image.len()).step_by(128 << 10).take(64) {
        assert!(c.read(off as u64, 128 << 10).unwrap() == env.image[off..off + (128 << 10)]);
    }

    // Writes, write-zeroes and discard, then FLUSH.
    let mut model = env.image.clone();
    let mut apply = |c: &mut Client, off: usize, data: Vec<u8>| {
        c.write(off as u64, &data).unwrap();
        model[off..off + data.len()].copy_from_slice(&data);
    };
    apply(&mut c, 4096, vec![0xa1; 8192]);
    // Whole 4 KiB blocks only: a partial block is refused, nothing written.
    assert!(c.write(5 * MIB as u64 + 512, &[0xb2; 1536]).is_err());
    apply(&mut c, 23 * MIB, (0..65536).map(|i| i as u8).collect());
    // A request larger than the server's scratch (1 MiB): written in pieces.
    let big: Vec<u8> = (0..4 * MIB).map(|i| (i / 4096) as u8).collect();
    c.write_pieces(12 * MIB as u64, &big, 4).unwrap();
    model[12 * MIB..16 * MIB].copy_from_slice(&big);
    c.write_zeroes(MIB as u64, 3 * 4096).unwrap();
    model[MIB..MIB + 3 * 4096].fill(0);
    c.discard(7 * MIB as u64, 64 << 10).unwrap();
    model[7 * MIB..7 * MIB + (64 << 10)].fill(0);
    c.flush().unwrap();
    for off in [
        0usize,
        4096,
        MIB,
        5 * MIB,
        7 * MIB,
        12 * MIB,
        15 * MIB,
        23 * MIB,
    ] {
        assert!(c.read(off as u64, 128 << 10).unwrap() == model[off..off + (128 << 10)]);
    }
    // Out of range: an error, not a crash.
    assert!(c.read(env.image.len() as u64, 4096).is_err());
    drop(c);

    // SIGTERM: flushed and exits cleanly; a new server serves the overlay.
    server.signal("-TERM");
    let mut server = env.serve(&[]);
    let mut c = connect(&server.socket, 1);
    let whole = read_all(&mut c, env.image.len());
    assert!(
        whole == model,
        "after SIGTERM and restart the overlay serves on"
    );

    // kill -9 after a FLUSH: the flushed write is there after a restart.
    c.write(9 * MIB as u64, &[0xc3; 4096]).unwrap();
    c.flush().unwrap();
    model[9 * MIB..9 * MIB + 4096].fill(0xc3);
    drop(c);
    server.signal("-KILL");
    let server = env.serve(&[]);
    let mut c = connect(&server.socket, 1);
    assert!(
        read_all(&mut c, env.image.len()) == model,
        "flushed writes survive kill -9"
    );
}

/// Every queue of a 4-queue disk serves reads, writes and FLUSH; a FLUSH
/// on one queue makes the writes completed on the others durable. The
/// server is killed (kill -9) with the client still connected, so no
/// disconnect flush runs: what survives was made durable by the FLUSH. A
/// write after it, never flushed, reads after the restart as written or as
/// the image, never as zeros.
#[test]
fn every_queue_serves_io_and_a_flush_on_one_covers_writes_on_the_others() {
    let env = Env::new();
    let mut server = env.serve(&["--queues", "4"]);
    let mut c = connect(&server.socket, 4);
    assert_eq!(c.queues(), 4);
    let mut model = env.image.clone();
    for q in 0..4 {
        c.use_queue(q);
        let off = (2 + 5 * q) * MIB + 4096;
        let data = vec![0x40 + q as u8; 8192];
        c.write(off as u64, &data).unwrap();
        model[off..off + data.len()].copy_from_slice(&data);
        // Read back on this queue and on the next one.
        assert_eq!(c.read(off as u64, 8192).unwrap(), data);
        c.use_queue((q + 1) % 4);
        assert_eq!(c.read(off as u64, 8192).unwrap(), data);
        c.use_queue(q);
        c.flush().unwrap();
    }
    // Written on queues 0..3, flushed on queue 3 alone.
    for q in 0..3 {
        c.use_queue(q);
        let off = (3 + 5 * q) * MIB;
        let data = vec![0x50 + q as u8; 4096];
        c.write(off as u64, &data).unwrap();
        model[off..off + 4096].copy_from_slice(&data);
    }
    c.use_queue(3);
    c.flush().unwrap();
    // Completed, never flushed.
    let unflushed = 20 * MIB;
    c.use_queue(1);
    c.write(unflushed as u64, &[0x66; 4096]).unwrap();
    server.signal("-KILL");
    drop(c);

    let server = env.serve(&[]);
    let mut c = connect(&server.socket, 1);
    let got = read_all(&mut c, env.image.len());
    let after = &got[unflushed..unflushed + 4096];
    assert!(
        after == &env.image[unflushed..unflushed + 4096] || after == &[0x66; 4096][..],
        "an unflushed write reads as written or as the image, never anything else"
    );
    model[unflushed..unflushed + 4096].copy_from_slice(after);
    assert!(
        got == model,
        "a FLUSH on one queue covers writes on the others"
    );
}

#[test]
fn a_read_only_disk_refuses_writes() {
    use common::raw_blk::{
        RawBlk, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    let env = Env::new();
    let server = env.serve(&["--read-only"]);
    // A frontend that sends the write anyway (libblkio refuses it on the
    // client side): the server itself refuses it, and writes nothing. A
    // read on the same queue shows the frontend works.
    {
        let mut raw = RawBlk::connect(&server.socket);
        let (status, data) = raw.request(VIRTIO_BLK_T_IN, 8, &[0; 4096]);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(data == env.image[4096..8192]);
        let (status, _) = raw.request(VIRTIO_BLK_T_OUT, 8, &[0xee; 4096]);
        assert_eq!(status, VIRTIO_BLK_S_IOERR, "the server refused the write");
        let (status, data) = raw.request(VIRTIO_BLK_T_IN, 8, &[0; 4096]);
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert!(data == env.image[4096..8192], "nothing was written");
    }
    // The device says it is read-only: a read-write client is turned away.
    let mut b = Blkio::new("virtio-blk-vhost-user").unwrap();
    b.set_str("path", server.socket.to_str().unwrap()).unwrap();
    b.connect().unwrap();
    assert!(b.start().is_err(), "RO must be advertised");
    drop(b);
    let mut c = Client::connect_with(&server.socket, 1, true).unwrap();
    assert!(c.read(0, 4096).unwrap() == env.image[..4096]);
    assert!(c.write(0, &[1; 4096]).is_err());
}

fn read_all(c: &mut Client, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    for off in (0..len).step_by(MIB) {
        out.extend(c.read(off as u64, MIB.min(len - off)).unwrap());
    }
    out
}
