//! Booting the test guest (fixtures/build-guest.sh) in QEMU (TCG) on a
//! vhost-user-blk socket and timing it.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Times of one boot, from QEMU's start.
#[derive(Debug, Clone, Copy)]
pub struct Boot {
    /// Until the guest's `/init` printed its first line.
    pub to_init_s: f64,
    /// The guest kernel's uptime at that line.
    pub guest_uptime_s: f64,
    /// Until QEMU exited after the guest powered off.
    pub total_s: f64,
}

/// The guest's root disk.
#[derive(Debug, Clone, Copy)]
pub enum Disk<'a> {
    /// A vhost-user-blk backend listening on this socket.
    VhostUser(&'a Path),
    /// A raw file served by QEMU's own virtio-blk (through the host's page
    /// cache, as qemu-storage-daemon serves its file).
    VirtioBlk(&'a Path),
}

/// One QEMU run of a guest fixture.
pub struct Launch<'a> {
    /// Holds `vmlinuz` and `initramfs.cpio.gz`.
    pub guest_dir: &'a Path,
    pub disk: Disk<'a>,
    pub memory_mib: u64,
    /// Appended to the kernel command line.
    pub append: String,
    pub timeout: Duration,
}

/// What a run printed and how long it took.
pub struct Console {
    pub boot: Boot,
    pub lines: Vec<String>,
}

/// Boots the guest in `guest_dir` with its root disk on `socket` and the
/// job `cairn.test=job`; waits for it to power off.
pub fn boot(guest_dir: &Path, socket: &Path, job: &str) -> Result<Boot> {
    let launch = Launch {
        guest_dir,
        disk: Disk::VhostUser(socket),
        memory_mib: 512,
        append: format!("cairn.test={job}"),
        timeout: Duration::from_secs(180),
    };
    Ok(run(&launch)?.boot)
}

/// Boots a guest and waits for it to power off; a line with
/// `CAIRN-GUEST:` (the guest's own failure report) fails the run.
pub fn run(l: &Launch) -> Result<Console> {
    let started = Instant::now();
    let mem = l.memory_mib;
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-smp", "1", "-nographic"])
        .args(["-m", &format!("{mem}M"), "-no-reboot", "-net", "none"])
        .arg("-object")
        .arg(format!("memory-backend-memfd,id=mem,size={mem}M,share=on"))
        .args(["-numa", "node,memdev=mem"]);
    match l.disk {
        Disk::VhostUser(socket) => qemu
            .arg("-chardev")
            .arg(format!("socket,id=c0,path={}", socket.display()))
            // config-wce=off: the guest picks its cache mode from the FLUSH
            // feature. With it on, qemu-storage-daemon's export reports a
            // write-through cache and the guest never flushes it, which
            // makes its fsyncs free and its numbers not comparable.
            .args([
                "-device",
                "vhost-user-blk-pci,chardev=c0,num-queues=1,config-wce=off",
            ]),
        Disk::VirtioBlk(file) => qemu
            .arg("-drive")
            .arg(format!(
                "file={},format=raw,if=none,id=d0,cache=writeback",
                file.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0,num-queues=1"]),
    };
    let mut child = qemu
        .arg("-kernel")
        .arg(l.guest_dir.join("vmlinuz"))
        .arg("-initrd")
        .arg(l.guest_dir.join("initramfs.cpio.gz"))
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 {}", l.append))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64 (Debian package qemu-system-x86)")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let deadline = started + l.timeout;
    let mut init = None;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((at, line)) => {
                if let Some(rest) = line.split("CAIRN-INIT").nth(1) {
                    let uptime = rest
                        .split_whitespace()
                        .find_map(|w| w.strip_prefix("uptime="))
                        .and_then(|u| u.parse().ok())
                        .unwrap_or(f64::NAN);
                    init = Some(((at - started).as_secs_f64(), uptime));
                }
                if line.contains("CAIRN-GUEST:") {
                    let _ = child.kill();
                    let _ = child.wait();
                    bail!("the guest failed: {line}");
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the guest did not power off within {:?}", l.timeout);
            }
        }
    }
    child.wait()?;
    let total_s = started.elapsed().as_secs_f64();
    let Some((to_init_s, guest_uptime_s)) = init else {
        bail!("the guest never reached /init");
    };
    Ok(Console {
        boot: Boot {
            to_init_s,
            guest_uptime_s,
            total_s,
        },
        lines,
    })
}
