//! Support for the OCI import tests: fixtures, a file:// store, and two
//! independent readers of a file tree: debugfs over cairn's ext4 disk, and
//! the host's file system (for `umoci unpack`).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};

use cairn_engine::chunkstore::{ChunkStore, ChunkStoreConfig};
use cairn_engine::import::ImportOptions;
use cairn_engine::objstore::{open_store, StoreUri};
use cairn_engine::oci::layer::Limits;
use cairn_engine::oci::source::Platform;
use cairn_engine::oci::{OciError, OciImport, OciOptions};
use sha2::{Digest, Sha256};

/// The layouts `fixtures/build-oci-layouts.py` builds (once per run).
pub fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("oci-fixtures");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/build-oci-layouts.py");
        let st = Command::new("python3")
            .arg(&script)
            .arg(&out)
            .output()
            .expect("run python3");
        assert!(
            st.status.success(),
            "{}",
            String::from_utf8_lossy(&st.stderr)
        );
        out
    })
}

pub struct Store {
    pub dir: tempfile::TempDir,
    pub rt: tokio::runtime::Runtime,
    pub store: ChunkStore,
}

impl Store {
    pub fn new() -> Store {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let uri: StoreUri = format!("file://{}", dir.path().join("store").display())
            .parse()
            .unwrap();
        let remote = rt.block_on(open_store(&uri)).unwrap();
        rt.block_on(remote.prepare()).unwrap();
        let cfg = ChunkStoreConfig::new(dir.path().join("cache"), 1 << 30);
        let store = rt.block_on(ChunkStore::open(remote, cfg)).unwrap();
        Store { dir, rt, store }
    }

    pub fn staging(&self) -> PathBuf {
        self.dir.path().join("staging")
    }

    pub fn options(&self) -> OciOptions {
        OciOptions {
            platform: Platform::parse("linux/amd64").unwrap(),
            disk_size: None,
            insecure: false,
            docker_config: None,
            limits: Limits::default(),
            import: ImportOptions::new(self.staging()),
            runtime: self.rt.handle().clone(),
        }
    }

    pub fn import_with(&self, reference: &str, opts: &OciOptions) -> Result<OciImport, OciError> {
        cairn_engine::oci::import(&self.store, reference, opts, &|_| {})
    }

    pub fn import(&self, reference: &str) -> Result<OciImport, OciError> {
        self.import_with(reference, &self.options())
    }

    /// Writes an imported image's disk to a file.
    pub fn export(&self, imp: &OciImport, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        cairn_engine::export::export_raw(&self.store, &imp.manifest, &path, &|_| {}).unwrap();
        path
    }

    /// Files left in the staging directory (the spool must be gone).
    pub fn staging_leftovers(&self) -> Vec<String> {
        std::fs::read_dir(self.staging())
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n != ".lock")
                    .collect()
            })
            .unwrap_or_default()
    }
}

pub fn layout(name: &str) -> String {
    format!("oci:{}:latest", fixtures().join(name).display())
}

/// `e2fsck -fn`: the file system must be clean.
pub fn e2fsck(img: &Path) {
    let out = Command::new("e2fsck")
        .args(["-fn"])
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {} failed:\n{}{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One file as both readers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub sha256: String,
    pub link: String,
    pub dev: (u32, u32),
    pub xattrs: BTreeMap<String, Vec<u8>>,
    /// Inode number: compared only as "which paths share one".
    pub ino: u64,
}

pub type TreeMap = BTreeMap<String, Entry>;

fn sha(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn kind_of_mode(mode: u32) -> char {
    match mode & 0o170000 {
        0o040000 => 'd',
        0o100000 => 'f',
        0o120000 => 'l',
        0o020000 => 'c',
        0o060000 => 'b',
        0o010000 => 'p',
        _ => '?',
    }
}

/// Runs debugfs commands on `img`; the output of each, in order.
fn debugfs(img: &Path, cmds: &[String]) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("cmds");
    std::fs::write(&f, cmds.join("\n") + "\n").unwrap();
    let out = Command::new("debugfs")
        .arg("-f")
        .arg(&f)
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "debugfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut parts: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.starts_with("debugfs: ") {
            parts.push(String::new());
        } else if let Some(p) = parts.last_mut() {
            p.push_str(line);
            p.push('\n');
        }
    }
    assert_eq!(parts.len(), cmds.len(), "debugfs output:\n{text}");
    parts
}

fn q(path: &str) -> String {
    format!("\"{path}\"")
}

/// The tree in an ext4 image, read by debugfs (e2fsprogs), not by cairn.
pub fn ext4_tree(img: &Path) -> TreeMap {
    let mut tree = TreeMap::new();
    let mut dirs = vec![String::from("/")];
    while !dirs.is_empty() {
        let outs = debugfs(
            img,
            &dirs
                .iter()
                .map(|d| format!("ls -p {}", q(d)))
                .collect::<Vec<_>>(),
        );
        let mut next = Vec::new();
        for (dir, out) in dirs.iter().zip(outs) {
            for line in out.lines().filter(|l| l.starts_with('/')) {
                let f: Vec<&str> = line.split('/').collect();
                // "", ino, mode, uid, gid, name, size, ""
                let name = f[5..f.len() - 2].join("/");
                if name == "." || name == ".." || (dir == "/" && name == "lost+found") {
                    continue;
                }
                let path = if dir == "/" {
                    format!("/{name}")
                } else {
                    format!("{dir}/{name}")
                };
                let mode = u32::from_str_radix(f[2], 8).unwrap();
                let kind = kind_of_mode(mode);
                if kind == 'd' {
                    next.push(path.clone());
                }
                tree.insert(
                    path,
                    Entry {
                        kind,
                        mode: mode & 0o7777,
                        uid: f[3].parse().unwrap(),
                        gid: f[4].parse().unwrap(),
                        size: if kind == 'f' {
                            f[f.len() - 2].parse().unwrap()
                        } else {
                            0
                        },
                        sha256: String::new(),
                        link: String::new(),
                        dev: (0, 0),
                        xattrs: BTreeMap::new(),
                        ino: f[1].parse().unwrap(),
                    },
                );
            }
        }
        dirs = next;
    }
    // Contents, link targets, device numbers, xattrs.
    let dump = tempfile::tempdir().unwrap();
    let paths: Vec<String> = tree.keys().cloned().collect();
    let mut cmds = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        match tree[p].kind {
            'f' => cmds.push(format!(
                "dump {} {}",
                q(p),
                dump.path().join(i.to_string()).display()
            )),
            'l' | 'c' | 'b' => cmds.push(format!("stat {}", q(p))),
            _ => cmds.push(format!("ea_list {}", q(p))),
        }
        cmds.push(format!("ea_list {}", q(p)));
    }
    let outs = debugfs(img, &cmds);
    let mut ea_cmds = Vec::new();
    for (i, p) in paths.iter().enumerate() {
        let e = tree.get_mut(p).unwrap();
        let stat = &outs[2 * i];
        match e.kind {
            'f' => e.sha256 = sha(&std::fs::read(dump.path().join(i.to_string())).unwrap()),
            'l' => {
                let t = stat
                    .lines()
                    .find_map(|l| l.strip_prefix("Fast link dest: "))
                    .map(|s| s.trim_matches('"').to_owned());
                e.link = t.unwrap_or_default();
            }
            'c' | 'b' => {
                let nums = stat
                    .lines()
                    .find_map(|l| l.split_once("Device major/minor number:").map(|(_, n)| n))
                    .unwrap_or_else(|| panic!("no device number for {p}:\n{stat}"));
                let mut it = nums.split_whitespace().next().unwrap().split(':');
                e.dev = (
                    it.next().unwrap().parse().unwrap(),
                    it.next().unwrap().parse().unwrap(),
                );
            }
            _ => {}
        }
        for line in outs[2 * i + 1].lines().skip(1) {
            let line = line.trim_start();
            if let Some((name, _)) = line.split_once(" (") {
                let file = dump.path().join(format!("ea-{}", ea_cmds.len()));
                ea_cmds.push((p.clone(), name.to_owned(), file.clone()));
            }
        }
    }
    // Slow symlinks: dump their block.
    let slow: Vec<String> = tree
        .iter()
        .filter(|(_, e)| e.kind == 'l' && e.link.is_empty())
        .map(|(p, _)| p.clone())
        .collect();
    let mut cmds: Vec<String> = ea_cmds
        .iter()
        .map(|(p, n, f)| format!("ea_get -f {} {} {}", f.display(), q(p), n))
        .collect();
    for (i, p) in slow.iter().enumerate() {
        cmds.push(format!(
            "dump {} {}",
            q(p),
            dump.path().join(format!("l{i}")).display()
        ));
    }
    if !cmds.is_empty() {
        debugfs(img, &cmds);
    }
    for (p, n, f) in ea_cmds {
        let v = std::fs::read(&f).unwrap_or_default();
        tree.get_mut(&p).unwrap().xattrs.insert(n, v);
    }
    for (i, p) in slow.iter().enumerate() {
        let b = std::fs::read(dump.path().join(format!("l{i}"))).unwrap();
        tree.get_mut(p).unwrap().link = String::from_utf8_lossy(&b).into_owned();
    }
    tree
}

/// The tree under `root` on the host.
pub fn host_tree(root: &Path) -> TreeMap {
    let mut tree = TreeMap::new();
    let mut todo = vec![root.to_owned()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let md = std::fs::symlink_metadata(&p).unwrap();
            let ft = md.file_type();
            let kind = if ft.is_dir() {
                todo.push(p.clone());
                'd'
            } else if ft.is_file() {
                'f'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_char_device() {
                'c'
            } else if ft.is_block_device() {
                'b'
            } else if ft.is_fifo() {
                'p'
            } else {
                '?'
            };
            let mut xattrs = BTreeMap::new();
            let mut names = vec![0u8; 65536];
            let n = rustix::fs::llistxattr(&p, &mut names[..]).unwrap_or(0);
            for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty()) {
                let mut v = vec![0u8; 65536];
                let len = rustix::fs::lgetxattr(&p, name, &mut v[..]).unwrap();
                v.truncate(len);
                xattrs.insert(String::from_utf8_lossy(name).into_owned(), v);
            }
            let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
            let rdev = md.rdev();
            tree.insert(
                rel,
                Entry {
                    kind,
                    mode: md.mode() & 0o7777,
                    uid: md.uid(),
                    gid: md.gid(),
                    size: if kind == 'f' { md.len() } else { 0 },
                    sha256: if kind == 'f' {
                        sha(&std::fs::read(&p).unwrap())
                    } else {
                        String::new()
                    },
                    link: if kind == 'l' {
                        std::fs::read_link(&p)
                            .unwrap()
                            .to_string_lossy()
                            .into_owned()
                    } else {
                        String::new()
                    },
                    dev: if kind == 'c' || kind == 'b' {
                        (rustix::fs::major(rdev), rustix::fs::minor(rdev))
                    } else {
                        (0, 0)
                    },
                    xattrs,
                    ino: md.ino(),
                },
            );
        }
    }
    tree
}

/// Paths grouped by shared inode (hard links), in a comparable form.
pub fn link_groups(t: &TreeMap) -> Vec<Vec<String>> {
    let mut by: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for (p, e) in t.iter().filter(|(_, e)| e.kind != 'd') {
        by.entry(e.ino).or_default().push(p.clone());
    }
    let mut g: Vec<Vec<String>> = by.into_values().filter(|v| v.len() > 1).collect();
    g.sort();
    g
}

pub fn without_inos(t: &TreeMap) -> TreeMap {
    t.iter()
        .map(|(p, e)| {
            (
                p.clone(),
                Entry {
                    ino: 0,
                    ..e.clone()
                },
            )
        })
        .collect()
}

pub fn arc<T>(t: T) -> Arc<T> {
    Arc::new(t)
}
