//! QEMU guests for the end-to-end tests: the guest fixture's directory, a
//! booted guest whose console lines the test waits on (its console tail is
//! printed when a test fails while it runs), and a QMP client.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long a guest may take to boot (or to reach any one marker) under TCG.
pub const BOOT: Duration = Duration::from_secs(120);

/// The guest fixture (`fixtures/build-guest.sh`): CAIRN_GUEST_DIR or
/// fixtures/out/guest. Fails loudly when it is missing.
pub fn guest_dir() -> PathBuf {
    let dir = std::env::var_os("CAIRN_GUEST_DIR").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/out/guest"),
        PathBuf::from,
    );
    assert!(
        dir.join("rootfs.ext4").exists(),
        "guest fixture missing in {}: run fixtures/build-guest.sh (tools/dev/test.sh does)",
        dir.display()
    );
    dir
}

/// The value of `key=` in a console line.
pub fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// Console lines kept for the failure report.
const TAIL: usize = 80;

/// A running QEMU; its console lines arrive on a channel.
pub struct Guest {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    tail: Arc<Mutex<VecDeque<String>>>,
}

impl Guest {
    /// Starts `qemu` (a [`super::qemu_guest`] command, console on stdout)
    /// with its stdin piped to the guest's console. `name` labels its
    /// console in failure reports.
    pub fn start(name: &str, mut qemu: Command) -> Guest {
        let mut child = qemu
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting qemu-system-x86_64 (Debian package qemu-system-x86)");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let keep = tail.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                {
                    let mut t = keep.lock().unwrap_or_else(|p| p.into_inner());
                    if t.len() == TAIL {
                        t.pop_front();
                    }
                    t.push_back(line.clone());
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Guest {
            name: name.to_owned(),
            stdin: child.stdin.take(),
            child,
            lines,
            tail,
        }
    }

    /// The first console line (not yet taken) containing `marker`, within
    /// `limit` from now. A line saying the guest failed fails the test.
    pub fn expect(&mut self, marker: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(marker) => return line,
                Ok(line) if line.contains("CAIRN-GUEST") || line.contains("Kernel panic") => {
                    panic!("guest {} failed: {line}", self.name)
                }
                Ok(_) => {}
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("no {marker:?} from guest {} within {limit:?}", self.name)
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => panic!(
                    "guest {} ended its console without {marker:?} ({})",
                    self.name,
                    match self.child.try_wait() {
                        Ok(Some(st)) => format!("qemu exited with {st}"),
                        _ => "qemu still running".into(),
                    }
                ),
            }
        }
    }

    /// Types `line` on the guest's console (its /init reads it).
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("the guest's stdin is open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("typing on guest {}'s console: {e}", self.name));
    }

    /// Waits for QEMU to exit (the guest powers off); it must succeed.
    pub fn finish(mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(st) = self.child.try_wait().unwrap() {
                assert!(st.success(), "qemu of guest {} exited with {st}", self.name);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "qemu of guest {} did not exit after it powered off",
            self.name
        );
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let tail = self.tail.lock().unwrap_or_else(|p| p.into_inner());
            eprintln!(
                "--- console of guest {} (last {} lines) ---",
                self.name,
                tail.len()
            );
            for line in tail.iter() {
                eprintln!("{line}");
            }
            eprintln!("--- end of guest {}'s console ---", self.name);
        }
    }
}

/// A QMP connection to a QEMU started with `-qmp unix:PATH,server=on,wait=off`,
/// capabilities negotiated.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    pub fn connect(path: &Path) -> Qmp {
        let writer = UnixStream::connect(path)
            .unwrap_or_else(|e| panic!("connecting to QMP on {}: {e}", path.display()));
        writer
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(writer.try_clone().unwrap()),
            writer,
        };
        let greeting = qmp.read();
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities");
        qmp
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("reading from QMP: {e}"));
        assert!(!line.is_empty(), "QMP closed its socket");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    /// Runs `command` (no arguments); its `return` value. Events read on
    /// the way are skipped; an error fails the test.
    pub fn execute(&mut self, command: &str) -> Value {
        writeln!(self.writer, "{{\"execute\":\"{command}\"}}").unwrap();
        loop {
            let mut answer = self.read();
            if answer.get("event").is_some() {
                continue;
            }
            if let Some(r) = answer.get_mut("return") {
                return r.take();
            }
            panic!("QMP {command} failed: {answer}");
        }
    }
}
