//! Helpers shared by the tools test binaries; `daemon` (a daemon on a
//! store, driven by the CLI) and `qemu` (booted guests, QMP) for the
//! binaries that need them.

use std::process::{Command, Output};

#[allow(dead_code)]
pub mod daemon;
#[allow(dead_code)]
#[path = "../../../engine/tests/common/private_s3.rs"]
pub mod private_s3;
#[allow(dead_code)]
pub mod qemu;
#[allow(dead_code)]
pub mod raw_blk;

/// Runs `cmd` and returns its output; fails the test, with the command and
/// what it printed, unless it succeeded.
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// QEMU (TCG, 1 vCPU, 512 MiB) booting the guest fixture in `guest` from
/// the vhost-user-blk disk on `socket`, `append` added to the kernel's
/// command line; its console on stdout, piped.
#[allow(dead_code)]
pub fn qemu_guest(guest: &std::path::Path, socket: &std::path::Path, append: &str) -> Command {
    qemu_guest_with(guest, socket, append, "")
}

/// [`qemu_guest`] with `chardev` appended to the disk socket's chardev
/// options (e.g. `,reconnect=1`).
#[allow(dead_code)]
pub fn qemu_guest_with(
    guest: &std::path::Path,
    socket: &std::path::Path,
    append: &str,
    chardev: &str,
) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args(["-accel", "tcg", "-m", "512", "-smp", "1", "-nographic"])
        .args(["-no-reboot", "-net", "none"])
        .args(["-object", "memory-backend-memfd,id=mem,size=512M,share=on"])
        .args(["-numa", "node,memdev=mem", "-chardev"])
        .arg(format!("socket,id=c0,path={}{chardev}", socket.display()))
        .args(["-device", "vhost-user-blk-pci,chardev=c0,num-queues=1"])
        .arg("-kernel")
        .arg(guest.join("vmlinuz"))
        .arg("-initrd")
        .arg(guest.join("initramfs.cpio.gz"))
        .arg("-append")
        .arg(format!("console=ttyS0 quiet panic=-1 {append}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    c
}
