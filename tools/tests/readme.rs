//! The README's `console` blocks, run as written: each `$ command` line in
//! order, in one empty directory whose default `file://` store and cache
//! are there, with the built `cairn` first on PATH. A line must exit 0, or
//! with the code its `# exit N` comment names, so the README cannot drift
//! from the binary.

use std::path::Path;
use std::process::Command;

/// `(line number, command, expected exit code)` of every `$` line in a
/// ```` ```console ```` block.
fn console_commands(readme: &str) -> Vec<(usize, String, i32)> {
    let mut commands = Vec::new();
    let mut inside = false;
    for (i, line) in readme.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") {
            inside = trimmed == "```console";
            continue;
        }
        let Some(command) = line.strip_prefix("$ ").filter(|_| inside) else {
            continue;
        };
        let code = command
            .rsplit_once("# exit ")
            .and_then(|(_, n)| n.trim().parse().ok())
            .unwrap_or(0);
        commands.push((i + 1, command.to_owned(), code));
    }
    commands
}

#[test]
fn the_readme_s_console_blocks_run_as_written() {
    let readme_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let readme = std::fs::read_to_string(&readme_path).unwrap();
    let commands = console_commands(&readme);
    assert!(
        commands.len() >= 10,
        "few console lines found: {commands:?}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_cairn")).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    for (line, command, want) in commands {
        let mut cmd = Command::new("bash");
        cmd.args(["-o", "pipefail", "-c", &command])
            .current_dir(dir.path())
            .env("PATH", &path)
            .env("XDG_DATA_HOME", dir.path().join("data"))
            .env("XDG_CACHE_HOME", dir.path().join("cache"));
        for var in [
            "CAIRN_STORE",
            "CAIRN_CACHE_DIR",
            "CAIRN_CACHE_SIZE",
            "CAIRN_PROJECT",
        ] {
            cmd.env_remove(var);
        }
        let out = cmd.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(want),
            "README.md line {line}: `{command}` exited {:?}, not {want}\nstdout: {}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The commands used the default store, in the directory given.
    assert!(dir.path().join("data/cairn/store/manifests").is_dir());
}

#[test]
fn exit_codes_are_read_from_the_comment() {
    let text = "```console\n$ true\n$ false  # exit 1\n```\n```sh\n$ not-run\n```\n";
    assert_eq!(
        console_commands(text),
        [
            (2, "true".to_owned(), 0),
            (3, "false  # exit 1".to_owned(), 1)
        ]
    );
}
