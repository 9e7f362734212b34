//! The `cairn` binary end to end, on a `file://` store and on the S3 server.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

struct Env {
    dir: tempfile::TempDir,
    store: String,
}

impl Env {
    fn file_store() -> Env {
        let dir = tempfile::tempdir().unwrap();
        let store = format!("file://{}", dir.path().join("store").display());
        Env { dir, store }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn cairn(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(["--store", &self.store, "--cache-dir"])
            .arg(self.path("cache"))
            .args(["--cache-size", "256M"])
            .args(args)
            .output()
            .unwrap()
    }

    fn ok_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.cairn(&all);
        assert!(
            out.status.success(),
            "cairn {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// 12 MiB: text, random bytes, zeros, repeats; unaligned tail.
fn write_image(path: &Path, seed: u64) -> Vec<u8> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut img = Vec::new();
    for i in 0..48usize {
        match i % 4 {
            0 => img.extend(std::iter::repeat_n(0u8, 256 << 10)),
            1 => img.extend((0..256 << 10).map(|_| rng.u8(..))),
            2 => img.extend((0..256 << 10).map(|j: usize| b"a disk full of text "[j % 20])),
            _ => {
                let s = img.len() - (512 << 10);
                img.extend_from_within(s..s + (256 << 10));
            }
        }
    }
    img.extend_from_slice(b"an unaligned tail");
    std::fs::write(path, &img).unwrap();
    img
}

fn flip_blocks(src: &Path, dst: &Path, blocks: &[u64]) {
    let mut img = std::fs::read(src).unwrap();
    for &b in blocks {
        img[(b * 4096) as usize] ^= 0x5a;
    }
    std::fs::write(dst, img).unwrap();
}

#[test]
fn import_export_ls_describe_verify_round_trip() {
    let env = Env::file_store();
    let img = env.path("disk.raw");
    let bytes = write_image(&img, 1);

    let first = env.ok_json(&[
        "image",
        "import-raw",
        img.to_str().unwrap(),
        "--name",
        "base",
    ]);
    assert_eq!(first["logical_bytes"], bytes.len() as u64);
    assert!(first["new_bytes"].as_u64().unwrap() > 0);
    assert_eq!(first["new_bytes"], first["stored_bytes"]);
    let id = first["id"].as_str().unwrap().to_owned();

    // Same bytes again: nothing new.
    let again = env.ok_json(&[
        "image",
        "import-raw",
        img.to_str().unwrap(),
        "--name",
        "again",
    ]);
    assert_eq!(again["id"], first["id"]);
    assert_eq!(again["new_bytes"], 0);

    // 10 scattered 4 KiB changes: at most 10 new chunks.
    let changed = env.path("changed.raw");
    flip_blocks(
        &img,
        &changed,
        &[3, 200, 400, 700, 1000, 1500, 2000, 2300, 2600, 3000],
    );
    let c = env.ok_json(&[
        "image",
        "import-raw",
        changed.to_str().unwrap(),
        "--name",
        "changed",
    ]);
    assert!(c["new_chunks"].as_u64().unwrap() <= 10, "{c}");

    let out = env.path("out.raw");
    env.ok_json(&["image", "export", "base", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    // By id too.
    env.ok_json(&["image", "export", &id, out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), bytes);

    let ls = env.ok_json(&["image", "ls"]);
    let names: Vec<&str> = ls
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["again", "base", "changed"]);

    let d = env.ok_json(&["image", "describe", "base"]);
    assert_eq!(d["id"], first["id"]);
    assert_eq!(d["stored_bytes"], first["stored_bytes"]);
    assert_eq!(d["missing_chunks"], 0);
    // 12 zero segments of 256 KiB, 4 chunks each at the default 64 KiB.
    assert_eq!(d["zero_chunks"], 48);

    let v = env.ok_json(&["verify", "--deep"]);
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");
    assert!(v["chunks_rehashed"].as_u64().unwrap() > 0);

    // Human output too.
    let o = env.cairn(&["image", "describe", "base"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("missing chunks  0"));
}

#[test]
fn verify_names_a_rotten_pack_and_a_missing_one() {
    let env = Env::file_store();
    let img = env.path("disk.raw");
    write_image(&img, 2);
    env.ok_json(&[
        "image",
        "import-raw",
        img.to_str().unwrap(),
        "--name",
        "base",
    ]);
    let packs = env.path("store").join("packs");
    let pack = std::fs::read_dir(&packs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "pack"))
        .unwrap();

    // A flipped byte in a frame: the shallow pass cannot see it, --deep must.
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[300] ^= 0x01;
    std::fs::write(&pack, &bytes).unwrap();
    assert!(env.cairn(&["verify"]).status.success());
    let o = env.cairn(&["verify", "--deep"]);
    assert_eq!(o.status.code(), Some(3));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("CRC mismatch") && text.contains(".pack"),
        "{text}"
    );

    // A missing pack: every manifest's chunks in it are named.
    std::fs::remove_file(&pack).unwrap();
    let o = env.cairn(&["verify"]);
    assert_eq!(o.status.code(), Some(3));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("is missing"), "{text}");
}

#[test]
fn bad_input_gets_clear_errors() {
    let env = Env::file_store();
    let o = env.cairn(&["image", "describe", "nope"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("no image named `nope`"),
        "{}",
        stderr(&o)
    );

    let o = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--store", "ftp://x", "image", "ls"])
        .output()
        .unwrap();
    assert!(
        stderr(&o).contains("expected file:///DIR or s3://BUCKET/PREFIX"),
        "{}",
        stderr(&o)
    );

    let img = env.path("disk.raw");
    write_image(&img, 3);
    let o = env.cairn(&[
        "image",
        "import-raw",
        img.to_str().unwrap(),
        "--name",
        "bad/name",
    ]);
    assert!(
        stderr(&o).contains("not a valid image name"),
        "{}",
        stderr(&o)
    );
    let o = env.cairn(&[
        "image",
        "import-raw",
        img.to_str().unwrap(),
        "--name",
        "x",
        "--chunk-size",
        "3000",
    ]);
    assert!(stderr(&o).contains("power of two"), "{}", stderr(&o));
    let o = env.cairn(&["image", "import-raw", "/nonexistent", "--name", "x"]);
    assert!(stderr(&o).contains("/nonexistent"), "{}", stderr(&o));

    // A manifest of a future version: a clear error naming the version.
    let r = env.ok_json(&["image", "import-raw", img.to_str().unwrap(), "--name", "ok"]);
    let id = r["id"].as_str().unwrap();
    let mpath = env.path("store").join("manifests").join(id);
    let mut m = std::fs::read(&mpath).unwrap();
    m[8] = 9;
    std::fs::write(&mpath, &m).unwrap();
    let o = env.cairn(&["image", "describe", "ok"]);
    assert_eq!(o.status.code(), Some(1));
    // The digest no longer matches either; the digest check comes first.
    assert!(stderr(&o).contains(id), "{}", stderr(&o));
}

#[test]
fn s3_store_round_trip_through_the_cli() {
    let endpoint = std::env::var("CAIRN_TEST_S3_ENDPOINT")
        .expect("this test needs the S3 test server: run tools/dev/test.sh (it sets CAIRN_TEST_S3_ENDPOINT)");
    let mut env = Env::file_store();
    env.store = format!(
        "s3://cairn-cli-{:08x}/images?endpoint={endpoint}",
        fastrand::u32(..)
    );
    let img = env.path("disk.raw");
    let bytes = write_image(&img, 4);
    let r = env.ok_json(&[
        "image",
        "import-raw",
        img.to_str().unwrap(),
        "--name",
        "base",
    ]);
    assert!(r["new_bytes"].as_u64().unwrap() > 0);
    // A different host: a fresh cache, everything from S3.
    std::fs::remove_dir_all(env.path("cache")).unwrap();
    let out = env.path("out.raw");
    env.ok_json(&["image", "export", "base", out.to_str().unwrap()]);
    assert_eq!(std::fs::read(&out).unwrap(), bytes);
    let v = env.ok_json(&["verify", "--deep"]);
    assert!(v["problems"].as_array().unwrap().is_empty(), "{v}");
}

/// Starts `cairn mem serve ... --once --json`; returns it with its stdout
/// lines once it printed its ready line.
fn mem_serve(
    env: &Env,
    snapshot: &str,
    socket: &Path,
    extra: &[&str],
) -> (
    std::process::Child,
    std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
) {
    use std::io::BufRead;
    let mut child = Command::new(env!("CARGO_BIN_EXE_cairn"))
        .args(["--json", "--store", &env.store, "--cache-dir"])
        .arg(env.path("cache"))
        .args([
            "mem",
            "serve",
            snapshot,
            "--once",
            "--no-kill-vmm",
            "--socket",
        ])
        .arg(socket)
        .args(extra)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let ready: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(ready["ready"], true, "{ready}");
    (child, lines)
}

/// One resume of `snapshot` by a harness VMM that reads `pages` (in
/// order) and compares each with `memory`; the server's report.
fn mem_resume(env: &Env, snapshot: &str, memory: &[u8], pages: &[u64], extra: &[&str]) -> Value {
    use cairn_vmm_glue::uffd::harness::{RegionSpec, VmmHarness};
    let socket = env.path("mem.sock");
    let (mut child, mut lines) = mem_serve(env, snapshot, &socket, extra);
    let mut vmm = VmmHarness::new(&[RegionSpec {
        size: memory.len() as u64,
        page_size: 4096,
    }])
    .unwrap();
    vmm.connect(&socket).unwrap();
    let mut page = vec![0u8; 4096];
    for &p in pages {
        let at = (p * 4096) as usize;
        vmm.read(at as u64, &mut page);
        assert!(page == memory[at..at + 4096], "page {p} differs");
    }
    // The VMM is this process, which cannot exit: hang up and stop the
    // server as an operator would; it reports the resume and exits.
    vmm.disconnect();
    let term = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let report: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(report["resume"]["end"], "stopped", "{report}");
    report["resume"].clone()
}

#[test]
fn mem_import_export_diff_and_serve_through_the_cli() {
    use std::io::{Seek, SeekFrom, Write};
    let env = Env::file_store();
    let size = 8u64 << 20;
    let memory = cairn_vmm_glue::uffd::harness::synthetic_memory(size, 3);
    let base = env.path("base.mem");
    std::fs::write(&base, &memory).unwrap();
    let imported = env.ok_json(&["mem", "import", base.to_str().unwrap(), "--name", "base"]);
    assert_eq!(imported["logical_bytes"], size, "{imported}");
    let out = env.path("base.out");
    env.ok_json(&["mem", "export", "base", out.to_str().unwrap()]);
    assert!(std::fs::read(&out).unwrap() == memory, "export differs");

    // A Firecracker diff: written pages are data, the rest holes.
    let diff = env.path("diff.mem");
    let mut f = std::fs::File::create(&diff).unwrap();
    f.set_len(size).unwrap();
    let mut child = memory.clone();
    for p in [0u64, 7, 300, 1500, 2047] {
        let bytes = vec![p as u8 ^ 0xa5; 4096];
        f.seek(SeekFrom::Start(p * 4096)).unwrap();
        f.write_all(&bytes).unwrap();
        child[(p * 4096) as usize..][..4096].copy_from_slice(&bytes);
    }
    drop(f);
    let d = env.path("diff");
    env.ok_json(&[
        "mem",
        "import",
        diff.to_str().unwrap(),
        "--name",
        "child",
        "--parent",
        "base",
    ]);
    env.ok_json(&["mem", "export", "child", d.to_str().unwrap()]);
    assert!(
        std::fs::read(&d).unwrap() == child,
        "diff over its parent differs"
    );

    // Serve: record a resume, then the next one prefetches what it touched.
    let touched: Vec<u64> = (0..2048).filter(|p| p % 7 == 0 || p % 11 == 0).collect();
    let rec = mem_resume(&env, "child", &child, &touched, &["--record"]);
    assert!(rec["faults"].as_u64().unwrap() > 0, "{rec}");
    assert_eq!(rec["recorded_bytes"], touched.len() as u64 * 4096, "{rec}");
    let pre = mem_resume(&env, "child", &child, &touched, &[]);
    assert_eq!(
        pre["working_set_bytes"],
        touched.len() as u64 * 4096,
        "{pre}"
    );
    let installed = pre["prefetch_bytes"].as_u64().unwrap() + pre["fault_bytes"].as_u64().unwrap();
    assert!(pre["prefetch_bytes"].as_u64().unwrap() > 0, "{pre}");
    assert!(installed >= touched.len() as u64 * 4096, "{pre}");

    // Bad input: an unknown snapshot, a rate of 0, a diff of another size.
    let out = env.cairn(&[
        "mem",
        "serve",
        "nope",
        "--socket",
        env.path("x.sock").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
    let out = env.cairn(&[
        "mem",
        "serve",
        "child",
        "--prefetch-rate",
        "0",
        "--socket",
        env.path("x.sock").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("--prefetch-rate") && stderr(&out).contains("--no-prefetch"),
        "{}",
        stderr(&out)
    );
    let short = env.path("short.mem");
    std::fs::write(&short, vec![1u8; 4096]).unwrap();
    let out = env.cairn(&[
        "mem",
        "import",
        short.to_str().unwrap(),
        "--name",
        "bad",
        "--parent",
        "base",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("size"), "{}", stderr(&out));
}

/// Bad sizes and counts are clap's to refuse: exit 2, the argument named,
/// before any store is opened.
#[test]
fn bad_arguments_exit_2_with_the_argument_named() {
    let env = Env::file_store();
    let img = env.path("disk.raw");
    write_image(&img, 5);
    let img = img.to_str().unwrap();
    let cases: [(&[&str], &str); 6] = [
        (&["--cache-size", "5Q", "image", "ls"], "--cache-size"),
        (&["--readahead", "lots", "image", "ls"], "--readahead"),
        (
            &[
                "image",
                "import-raw",
                img,
                "--name",
                "x",
                "--chunk-size",
                "3000",
            ],
            "power of two",
        ),
        (
            &["image", "import", "oci:/x", "--disk-size", "big"],
            "--disk-size",
        ),
        (
            &[
                "disk",
                "serve",
                "x",
                "--socket",
                "/tmp/s",
                "--overlay",
                "/tmp/o",
                "--queues",
                "0",
            ],
            "--queues",
        ),
        (
            &[
                "mem",
                "serve",
                "x",
                "--socket",
                "/tmp/s",
                "--fault-size",
                "3K",
            ],
            "--fault-size",
        ),
    ];
    for (args, named) in cases {
        let out = env.cairn(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(named), "{args:?}: {}", stderr(&out));
    }
    assert!(
        !env.path("store").exists(),
        "a refused command opened the store"
    );
}

/// `--json` covers errors: one object on stdout (`error`, `kind`,
/// `detail`), the exit code unchanged, nothing but that on stdout.
#[test]
fn json_mode_reports_errors_as_one_object() {
    let env = Env::file_store();
    let out = env.cairn(&["--json", "image", "describe", "nope"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "not_found", "{v}");
    assert!(v["error"].as_str().unwrap().contains("nope"), "{v}");
    assert!(v["detail"].as_str().is_some(), "{v}");

    let out = env.cairn(&["--json", "--cache-size", "5Q", "image", "ls"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["kind"], "usage", "{v}");
    assert!(v["error"].as_str().unwrap().contains("--cache-size"), "{v}");
}

/// No S3 credentials anywhere: one line on stderr, naming the variables
/// and the profile looked at, and none of the SDK's own log records.
#[test]
fn missing_s3_credentials_give_one_line() {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cairn"));
    for (k, _) in std::env::vars() {
        if k.starts_with("AWS_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .env("HOME", home.path())
        .env("AWS_PROFILE", "cairn-test")
        // Off the instance metadata service: on a cloud VM it would answer.
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .args([
            "--store",
            "s3://no-creds/p?endpoint=http://127.0.0.1:9",
            "image",
            "ls",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let text = stderr(&out);
    assert_eq!(text.lines().count(), 1, "{text}");
    for named in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "`cairn-test`",
        "AWS_PROFILE",
    ] {
        assert!(text.contains(named), "{named} not in {text}");
    }
    assert!(!text.contains('\x1b'), "ANSI colour on a pipe: {text}");
}

/// Completions and the manual page come from the clap definitions.
#[test]
fn completions_and_man_page_are_generated() {
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_cairn"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        String::from_utf8(out.stdout).unwrap()
    };
    let bash = run(&["completions", "bash"]);
    assert!(
        bash.contains("import-raw") && bash.contains("--cache-size"),
        "{bash}"
    );
    assert!(run(&["completions", "zsh"]).contains("#compdef cairn"));
    let man = run(&["man"]);
    assert!(man.contains(".TH cairn") && man.contains("image"), "{man}");
}
