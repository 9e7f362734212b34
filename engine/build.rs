//! Builds `run-as/main.rs` as a static executable in `OUT_DIR`: the helper
//! through which a Dockerfile's RUN step drops to its USER inside the build
//! sandbox (`src/oci/build/sandbox.rs` embeds it). Static, because it runs
//! in the image's root file system, not the host's. It is compiled by
//! rustc directly (only the standard library), so the build's RUSTFLAGS
//! (sanitizers, instrumentation) do not reach it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=run-as/main.rs");
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let target = std::env::var("TARGET").expect("cargo sets TARGET");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut c = Command::new(rustc);
    c.args(["--edition", "2021", "--crate-name", "cairn_run_as"])
        .args([
            "-C",
            "opt-level=s",
            "-C",
            "panic=abort",
            "-C",
            "strip=symbols",
        ])
        .args(["-C", "target-feature=+crt-static", "--target", &target])
        .arg("-o")
        .arg(out.join("cairn-run-as"))
        .arg(
            PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"))
                .join("run-as/main.rs"),
        );
    let linker_var = format!(
        "CARGO_TARGET_{}_LINKER",
        target.to_uppercase().replace(['-', '.'], "_")
    );
    println!("cargo:rerun-if-env-changed={linker_var}");
    if let Some(linker) = std::env::var_os(&linker_var) {
        c.arg("-C").arg({
            let mut a = std::ffi::OsString::from("linker=");
            a.push(linker);
            a
        });
    }
    let status = c
        .status()
        .expect("cannot start rustc to build the run-as helper");
    assert!(
        status.success(),
        "building the static run-as helper failed ({status}); it links the C library statically (Debian: libc6-dev)"
    );
}
