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

/// Boots the guest in `guest_dir` with its root disk on `socket` and the
/// job `cairn.test=job`; waits for it to power off.
pub fn boot(guest_dir: &Path, socket: &Path, job: &str) -> Result<Boot> {
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "512", "-smp", "1", "-nographic"])
        .args(["-no-reboot", "-net", "none"])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .args(["-numa", "node,memdev=mem", "-chardev"])
        .arg(format!("socket,id=c0,path={}", socket.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"])
        .arg("-kernel")
        .arg(guest_dir.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest_dir.join("initramfs.cpio.gz"))
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 cairn.test={job}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting qemu-system-x86_64 (Debian package qemu-system-x86)")?;
    let stdout = child.stdout.take().expect("piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send((Instant::now(), line)).is_err() {
                break;
            }
        }
    });
    let deadline = started + Duration::from_secs(180);
    let mut init = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
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
                    bail!("the guest failed: {line}");
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                bail!("the guest did not power off within 180 s");
            }
        }
    }
    child.wait()?;
    let total_s = started.elapsed().as_secs_f64();
    let Some((to_init_s, guest_uptime_s)) = init else {
        bail!("the guest never reached /init");
    };
    Ok(Boot {
        to_init_s,
        guest_uptime_s,
        total_s,
    })
}
