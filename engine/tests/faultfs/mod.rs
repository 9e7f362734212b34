//! FaultFs, a fault injector: a FUSE file system (one flat directory,
//! passed through to a directory of real files) whose syncs can be made to
//! fail and whose power can be cut.
//!
//! It models what matters of a Linux file system to a program that relies
//! on `fsync`: a write is volatile until the file is synced; a power cut
//! loses every volatile write; a failed sync loses the volatile writes it
//! covered (the kernel drops the pages that failed writeback, so a read
//! then returns what the disk held) and reports the error once, so the
//! next sync succeeds. Directory operations (create, rename, unlink) are
//! durable at once. Needs root (it mounts with mount(2)) and /dev/fuse.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::consts::FOPEN_DIRECT_IO;
use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
};

const ROOT: u64 = 1;
const PAGE: u64 = 4096;
const TTL: Duration = Duration::ZERO;

/// One file: its bytes live in `backing`; `durable` has, for every page
/// written since the last sync, what that page held at the sync (and the
/// length the file had then).
struct Node {
    name: OsString,
    backing: File,
    durable: BTreeMap<u64, Vec<u8>>,
    durable_len: u64,
}

impl Node {
    fn len(&self) -> u64 {
        self.backing.metadata().map(|m| m.len()).unwrap_or(0)
    }

    /// Remembers the durable bytes of the pages `[offset, offset + len)`
    /// touches before they change.
    fn save(&mut self, offset: u64, len: u64) {
        let size = self.len();
        for page in offset / PAGE..(offset + len).div_ceil(PAGE) {
            self.durable.entry(page).or_insert_with(|| {
                let mut buf = vec![0u8; PAGE as usize];
                let at = page * PAGE;
                if at < size {
                    let n = (size - at).min(PAGE) as usize;
                    let _ = self.backing.read_exact_at(&mut buf[..n], at);
                }
                buf
            });
        }
    }

    /// Puts back what the file held at its last sync.
    fn revert(&mut self) {
        for (page, bytes) in std::mem::take(&mut self.durable) {
            let _ = self.backing.write_all_at(&bytes, page * PAGE);
        }
        let _ = self.backing.set_len(self.durable_len);
    }

    fn synced(&mut self) {
        self.durable.clear();
        self.durable_len = self.len();
    }
}

#[derive(Default)]
struct State {
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    /// Syncs to let through before failing `fail_syncs`.
    pass_syncs: u32,
    /// Syncs still to fail.
    fail_syncs: u32,
    /// Only syncs of the file of this name count (all files if `None`).
    fail_only: Option<OsString>,
    /// Syncs failed so far.
    failed_syncs: u32,
}

impl State {
    fn ino_of(&self, name: &OsStr) -> Option<u64> {
        self.nodes
            .iter()
            .find(|(_, n)| n.name == name)
            .map(|(&i, _)| i)
    }
}

fn lock(s: &Mutex<State>) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

struct Fs {
    dir: PathBuf,
    state: Arc<Mutex<State>>,
}

fn attr(ino: u64, size: u64, kind: FileType) -> FileAttr {
    let now = SystemTime::now();
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: now,
        mtime: now,
        ctime: now,
        crtime: now,
        kind,
        perm: if kind == FileType::Directory {
            0o755
        } else {
            0o644
        },
        nlink: 1,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: PAGE as u32,
        flags: 0,
    }
}

fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}

impl Filesystem for Fs {
    fn lookup(&mut self, _: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let s = lock(&self.state);
        match s.ino_of(name).filter(|_| parent == ROOT) {
            Some(ino) => {
                let len = s.nodes[&ino].len();
                reply.entry(&TTL, &attr(ino, len, FileType::RegularFile), 0)
            }
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _: &Request<'_>, ino: u64, _: Option<u64>, reply: ReplyAttr) {
        if ino == ROOT {
            return reply.attr(&TTL, &attr(ROOT, 0, FileType::Directory));
        }
        match lock(&self.state).nodes.get(&ino) {
            Some(n) => reply.attr(&TTL, &attr(ino, n.len(), FileType::RegularFile)),
            None => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        if ino == ROOT {
            return reply.attr(&TTL, &attr(ROOT, 0, FileType::Directory));
        }
        let mut s = lock(&self.state);
        let Some(n) = s.nodes.get_mut(&ino) else {
            return reply.error(libc::ENOENT);
        };
        if let Some(size) = size {
            let old = n.len();
            n.save(size.min(old), old.max(size) - size.min(old));
            if let Err(e) = n.backing.set_len(size) {
                return reply.error(errno(&e));
            }
        }
        reply.attr(&TTL, &attr(ino, n.len(), FileType::RegularFile))
    }

    fn open(&mut self, _: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match lock(&self.state).nodes.contains_key(&ino) {
            true => reply.opened(0, FOPEN_DIRECT_IO),
            false => reply.error(libc::ENOENT),
        }
    }

    fn create(
        &mut self,
        _: &Request<'_>,
        parent: u64,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if parent != ROOT {
            return reply.error(libc::ENOENT);
        }
        let mut s = lock(&self.state);
        if let Some(ino) = s.ino_of(name) {
            if flags & libc::O_EXCL != 0 {
                return reply.error(libc::EEXIST);
            }
            let len = s.nodes[&ino].len();
            return reply.created(
                &TTL,
                &attr(ino, len, FileType::RegularFile),
                0,
                0,
                FOPEN_DIRECT_IO,
            );
        }
        let backing = match OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(self.dir.join(name))
        {
            Ok(f) => f,
            Err(e) => return reply.error(errno(&e)),
        };
        s.next_ino += 1;
        let ino = s.next_ino;
        s.nodes.insert(
            ino,
            Node {
                name: name.to_owned(),
                backing,
                durable: BTreeMap::new(),
                durable_len: 0,
            },
        );
        reply.created(
            &TTL,
            &attr(ino, 0, FileType::RegularFile),
            0,
            0,
            FOPEN_DIRECT_IO,
        )
    }

    fn read(
        &mut self,
        _: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyData,
    ) {
        let s = lock(&self.state);
        let Some(n) = s.nodes.get(&ino) else {
            return reply.error(libc::ENOENT);
        };
        let len = n.len();
        let at = offset as u64;
        let want = (size as u64).min(len.saturating_sub(at)) as usize;
        let mut buf = vec![0u8; want];
        match n.backing.read_exact_at(&mut buf, at) {
            Ok(()) => reply.data(&buf),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &mut self,
        _: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        let mut s = lock(&self.state);
        let Some(n) = s.nodes.get_mut(&ino) else {
            return reply.error(libc::ENOENT);
        };
        n.save(offset as u64, data.len() as u64);
        match n.backing.write_all_at(data, offset as u64) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn fallocate(
        &mut self,
        _: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        length: i64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        let mut s = lock(&self.state);
        let Some(n) = s.nodes.get_mut(&ino) else {
            return reply.error(libc::ENOENT);
        };
        n.save(offset as u64, length as u64);
        // SAFETY: fallocate on a descriptor we own, with plain integers.
        let r = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&n.backing),
                mode,
                offset,
                length,
            )
        };
        match r {
            0 => reply.ok(),
            _ => reply.error(errno(&io::Error::last_os_error())),
        }
    }

    fn fsync(&mut self, _: &Request<'_>, ino: u64, _fh: u64, _datasync: bool, reply: ReplyEmpty) {
        let mut s = lock(&self.state);
        let counted = match (&s.fail_only, s.nodes.get(&ino)) {
            (Some(name), Some(n)) => &n.name == name,
            _ => true,
        };
        let failing = counted && s.fail_syncs > 0 && s.pass_syncs == 0;
        if counted {
            s.pass_syncs = s.pass_syncs.saturating_sub(1);
        }
        if failing {
            s.fail_syncs -= 1;
            s.failed_syncs += 1;
        }
        let Some(n) = s.nodes.get_mut(&ino) else {
            return reply.error(libc::ENOENT);
        };
        if failing {
            // Writeback failed: the pages are dropped, the error reported
            // once; what the disk holds is what was durable.
            n.revert();
            return reply.error(libc::EIO);
        }
        n.synced();
        reply.ok()
    }

    fn flush(&mut self, _: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        reply.ok()
    }

    fn fsyncdir(&mut self, _: &Request<'_>, _ino: u64, _fh: u64, _ds: bool, reply: ReplyEmpty) {
        reply.ok()
    }

    fn rename(
        &mut self,
        _: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        _flags: u32,
        reply: ReplyEmpty,
    ) {
        if parent != ROOT || newparent != ROOT {
            return reply.error(libc::ENOENT);
        }
        let mut s = lock(&self.state);
        let Some(ino) = s.ino_of(name) else {
            return reply.error(libc::ENOENT);
        };
        if let Err(e) = std::fs::rename(self.dir.join(name), self.dir.join(newname)) {
            return reply.error(errno(&e));
        }
        if let Some(old) = s.ino_of(newname) {
            s.nodes.remove(&old);
        }
        s.nodes.get_mut(&ino).expect("found above").name = newname.to_owned();
        reply.ok()
    }

    fn unlink(&mut self, _: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        let mut s = lock(&self.state);
        let Some(ino) = s.ino_of(name).filter(|_| parent == ROOT) else {
            return reply.error(libc::ENOENT);
        };
        let _ = std::fs::remove_file(self.dir.join(name));
        s.nodes.remove(&ino);
        reply.ok()
    }

    fn readdir(
        &mut self,
        _: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let s = lock(&self.state);
        let mut entries: Vec<(u64, FileType, OsString)> = vec![
            (ROOT, FileType::Directory, ".".into()),
            (ROOT, FileType::Directory, "..".into()),
        ];
        let mut files: Vec<_> = s
            .nodes
            .iter()
            .map(|(&i, n)| (i, FileType::RegularFile, n.name.clone()))
            .collect();
        files.sort_by(|a, b| a.2.cmp(&b.2));
        entries.extend(files);
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as i64, kind, &name) {
                break;
            }
        }
        reply.ok()
    }
}

/// A mounted FaultFs; unmounted when dropped.
pub struct FaultFs {
    state: Arc<Mutex<State>>,
    mountpoint: tempfile::TempDir,
    session: Option<fuser::BackgroundSession>,
    _backing: tempfile::TempDir,
}

impl FaultFs {
    /// Mounts an empty FaultFs on a fresh directory; `None` (with a note on
    /// stderr) where FUSE cannot be mounted (not root, no /dev/fuse), except
    /// under CI (`CI=true`, which provides FUSE): there it panics.
    pub fn mount() -> Option<FaultFs> {
        let backing = tempfile::tempdir().unwrap();
        let mountpoint = tempfile::tempdir().unwrap();
        let state = Arc::new(Mutex::new(State {
            next_ino: ROOT,
            ..State::default()
        }));
        let fs = Fs {
            dir: backing.path().to_owned(),
            state: state.clone(),
        };
        let options = [MountOption::FSName("cairn-faultfs".into())];
        match fuser::spawn_mount2(fs, mountpoint.path(), &options) {
            Ok(session) => Some(FaultFs {
                state,
                mountpoint,
                session: Some(session),
                _backing: backing,
            }),
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                panic!("FaultFs: cannot mount FUSE ({e}); this test needs root and /dev/fuse, which CI (CI=true) provides")
            }
            Err(e) => {
                eprintln!("FaultFs: cannot mount FUSE ({e}); skipped (needs root and /dev/fuse)");
                None
            }
        }
    }

    pub fn path(&self) -> &Path {
        self.mountpoint.path()
    }

    /// Lets `pass` syncs through, then makes `n` fail with EIO (each
    /// losing what it covered).
    pub fn fail_syncs(&self, pass: u32, n: u32) {
        let mut s = lock(&self.state);
        s.pass_syncs = pass;
        s.fail_syncs = n;
        s.fail_only = None;
    }

    /// Makes the next `n` syncs of the file named `name` fail with EIO.
    pub fn fail_syncs_of(&self, name: &str, n: u32) {
        let mut s = lock(&self.state);
        s.pass_syncs = 0;
        s.fail_syncs = n;
        s.fail_only = Some(name.into());
    }

    pub fn failed_syncs(&self) -> u32 {
        lock(&self.state).failed_syncs
    }

    /// Cuts the power: every file goes back to what it held at its last
    /// sync. Close the files first (drop whatever uses them).
    pub fn power_cut(&self) {
        for n in lock(&self.state).nodes.values_mut() {
            n.revert();
        }
    }
}

impl Drop for FaultFs {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            s.join();
        }
    }
}
