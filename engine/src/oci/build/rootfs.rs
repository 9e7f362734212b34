//! A build's root file system on the host: the tree written out for a RUN
//! step, and what the step changed read back as an OCI layer.
//!
//! Every file operation is relative to a directory descriptor and takes
//! one path component, never following a symbolic link (`O_NOFOLLOW`,
//! `AT_SYMLINK_NOFOLLOW`, `openat2` with `RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS` where a path has several components): the image's
//! own links cannot point these operations at the host.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rustix::fs::{
    self as rfs, AtFlags, FileType, Mode, OFlags, ResolveFlags, Timespec, Timestamps,
};

use crate::oci::error::OciError;
use crate::oci::tree::{Kind, NodeId, Time, Tree, ROOT};

/// Paths a sandbox mounts over; what a step leaves there is not its output.
const NOT_OUTPUT: &[&str] = &["proc", "dev", "sys", "etc/resolv.conf"];

fn io_err(what: &'static str, path: &str, e: impl Into<io::Error>) -> OciError {
    OciError::io(what, PathBuf::from(path), e.into())
}

fn open_dir(dirfd: impl AsFd, name: &[u8]) -> io::Result<OwnedFd> {
    Ok(rfs::openat(
        dirfd,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// A directory beneath `root` by its components, no link followed.
fn open_beneath(root: impl AsFd, comps: &[Vec<u8>]) -> io::Result<OwnedFd> {
    if comps.is_empty() {
        return Ok(rfs::openat(
            root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?);
    }
    let path = comps.join(&b'/');
    Ok(rfs::openat2(
        root,
        path.as_slice(),
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS,
    )?)
}

/// `/proc/self/fd/N/NAME`: a path the l*xattr calls take without
/// following the last component.
fn fd_path(dirfd: &impl AsRawFd, name: &[u8]) -> Vec<u8> {
    let mut p = format!("/proc/self/fd/{}/", dirfd.as_raw_fd()).into_bytes();
    p.extend_from_slice(name);
    p
}

fn ts(t: Time) -> Timespec {
    Timespec {
        tv_sec: t.sec,
        tv_nsec: i64::from(t.nsec) as _,
    }
}

/// Creates directory `path` (absolute in the image) and its parents
/// under `root`, following no link.
pub fn mkdir_all(root: &Path, path: &str) -> io::Result<()> {
    let mut fd = open_dir(rfs::CWD, root.as_os_str().as_encoded_bytes())?;
    for c in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if c == ".." {
            return Err(io::Error::other("`..` in a WORKDIR"));
        }
        match rfs::mkdirat(&fd, c, Mode::from_raw_mode(0o755)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        fd = open_dir(&fd, c.as_bytes())?;
    }
    Ok(())
}

/// Files the builder reads from the build root (passwd, group) are
/// refused beyond this size.
const READ_CAP: u64 = 16 << 20;

/// The text of file `path` (relative, under `root`), following no link;
/// empty when it does not exist.
pub fn read_text(root: &Path, path: &str) -> Result<String, OciError> {
    let shown = root.join(path);
    let read = || -> io::Result<Option<Vec<u8>>> {
        let root_fd = open_dir(rfs::CWD, root.as_os_str().as_encoded_bytes())?;
        let mut comps: Vec<Vec<u8>> = path.split('/').map(|c| c.as_bytes().to_vec()).collect();
        let name = comps.pop().unwrap_or_default();
        let dir = match open_beneath(&root_fd, &comps) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let f: File = match rfs::openat(
            &dir,
            name.as_slice(),
            // NONBLOCK: a FIFO there must not hang the build.
            OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK,
            Mode::empty(),
        ) {
            Ok(f) => f.into(),
            Err(rustix::io::Errno::NOENT) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        if !f.metadata()?.is_file() {
            return Err(io::Error::other("not a regular file"));
        }
        let mut buf = Vec::new();
        f.take(READ_CAP + 1).read_to_end(&mut buf)?;
        if buf.len() as u64 > READ_CAP {
            return Err(io::Error::other(format!("larger than {READ_CAP} bytes")));
        }
        Ok(Some(buf))
    };
    match read() {
        Ok(b) => Ok(String::from_utf8_lossy(&b.unwrap_or_default()).into_owned()),
        Err(e) => Err(OciError::io("cannot read", shown, e)),
    }
}

/// Writes the live tree to `root` (an empty directory).
pub fn materialize(tree: &Tree, spool: &File, root: &Path) -> Result<(), OciError> {
    let show = root.display().to_string();
    let rootfd = open_dir(rfs::CWD, root.as_os_str().as_encoded_bytes())
        .map_err(|e| io_err("cannot open the build root", &show, e))?;
    let mut first_link: HashMap<NodeId, (Vec<Vec<u8>>, Vec<u8>)> = HashMap::new();
    let mut w = Writer {
        tree,
        spool,
        root: &rootfd,
        first_link: &mut first_link,
    };
    w.dir(&rootfd, ROOT, &mut Vec::new())
        .map_err(|e| io_err("cannot write the build root", &show, e))?;
    set_meta(&rootfd, b".", tree, ROOT).map_err(|e| io_err("cannot write the build root", &show, e))
}

struct Writer<'a> {
    tree: &'a Tree,
    spool: &'a File,
    root: &'a OwnedFd,
    first_link: &'a mut HashMap<NodeId, (Vec<Vec<u8>>, Vec<u8>)>,
}

impl Writer<'_> {
    fn dir(&mut self, fd: &OwnedFd, id: NodeId, path: &mut Vec<Vec<u8>>) -> io::Result<()> {
        let Some(d) = self.tree.dir(id) else {
            return Ok(());
        };
        for e in d.entries.iter().filter(|e| e.live()) {
            let name = e.name.as_slice();
            let node = self.tree.node(e.node);
            if let Some((dpath, dname)) = self.first_link.get(&e.node) {
                let from = open_beneath(self.root, dpath)?;
                rfs::linkat(&from, dname.as_slice(), fd, name, AtFlags::empty())?;
                continue;
            }
            let mode = Mode::from_raw_mode(u32::from(node.meta.mode) as _);
            match &node.kind {
                Kind::Dir(_) => {
                    rfs::mkdirat(fd, name, Mode::from_raw_mode(0o700))?;
                    let sub = open_dir(fd, name)?;
                    path.push(name.to_vec());
                    self.dir(&sub, e.node, path)?;
                    path.pop();
                }
                Kind::File { offset, len } => {
                    let f: File = rfs::openat(
                        fd,
                        name,
                        OFlags::WRONLY
                            | OFlags::CREATE
                            | OFlags::EXCL
                            | OFlags::NOFOLLOW
                            | OFlags::CLOEXEC,
                        Mode::from_raw_mode(0o600),
                    )?
                    .into();
                    copy_range(self.spool, *offset, *len, &f)?;
                    self.first_link
                        .insert(e.node, (path.clone(), name.to_vec()));
                }
                Kind::Symlink(t) => rfs::symlinkat(t.as_slice(), fd, name)?,
                Kind::Char(ma, mi) => rfs::mknodat(
                    fd,
                    name,
                    FileType::CharacterDevice,
                    mode,
                    rfs::makedev(*ma, *mi),
                )?,
                Kind::Block(ma, mi) => rfs::mknodat(
                    fd,
                    name,
                    FileType::BlockDevice,
                    mode,
                    rfs::makedev(*ma, *mi),
                )?,
                Kind::Fifo => rfs::mknodat(fd, name, FileType::Fifo, mode, 0)?,
            }
            set_meta(fd, name, self.tree, e.node)?;
        }
        Ok(())
    }
}

fn copy_range(spool: &File, offset: u64, len: u64, out: &File) -> io::Result<()> {
    let mut buf = vec![0u8; (1 << 20).min(len as usize)];
    let mut done = 0u64;
    let mut w = io::BufWriter::new(out);
    while done < len {
        let n = buf.len().min((len - done) as usize);
        spool.read_exact_at(&mut buf[..n], offset + done)?;
        w.write_all(&buf[..n])?;
        done += n as u64;
    }
    w.flush()
}

/// Owner, mode, xattrs and mtime of the entry `name` in `fd`.
fn set_meta(fd: &OwnedFd, name: &[u8], tree: &Tree, id: NodeId) -> io::Result<()> {
    let n = tree.node(id);
    let link = matches!(n.kind, Kind::Symlink(_));
    rfs::chownat(
        fd,
        name,
        Some(rfs::Uid::from_raw(n.meta.uid)),
        Some(rfs::Gid::from_raw(n.meta.gid)),
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    if !link {
        rfs::chmodat(
            fd,
            name,
            Mode::from_raw_mode(u32::from(n.meta.mode) as _),
            AtFlags::empty(),
        )?;
    }
    for (k, v) in &n.meta.xattrs {
        rfs::lsetxattr(
            fd_path(fd, name).as_slice(),
            k.as_slice(),
            v,
            rfs::XattrFlags::empty(),
        )?;
    }
    let t = ts(n.meta.mtime);
    rfs::utimensat(
        fd,
        name,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )?;
    Ok(())
}

/// What the host has at one path.
struct Seen {
    stat: rfs::Stat,
    xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

fn xattrs_of(fd: &OwnedFd, name: &[u8]) -> io::Result<BTreeMap<Vec<u8>, Vec<u8>>> {
    let p = fd_path(fd, name);
    let mut out = BTreeMap::new();
    let mut names = vec![0u8; 64 << 10];
    let n = match rfs::llistxattr(p.as_slice(), &mut names[..]) {
        Ok(n) => n,
        Err(rustix::io::Errno::NOTSUP) => return Ok(out),
        Err(e) => return Err(e.into()),
    };
    for k in names[..n].split(|&b| b == 0).filter(|k| !k.is_empty()) {
        let mut v = vec![0u8; 64 << 10];
        let len = rfs::lgetxattr(p.as_slice(), k, &mut v[..])?;
        v.truncate(len);
        out.insert(k.to_vec(), v);
    }
    Ok(out)
}

fn kind_of(st: &rfs::Stat) -> FileType {
    FileType::from_raw_mode(st.st_mode as _)
}

/// Writes what changed under `root` since `tree` as an OCI layer (a tar)
/// into `out`. Returns the number of entries.
pub fn diff(tree: &Tree, root: &Path, out: &mut File) -> Result<u64, OciError> {
    let show = root.display().to_string();
    let rootfd = open_dir(rfs::CWD, root.as_os_str().as_encoded_bytes())
        .map_err(|e| io_err("cannot open the build root", &show, e))?;
    let mut b = tar::Builder::new(io::BufWriter::new(out));
    b.mode(tar::HeaderMode::Complete);
    let mut d = Differ {
        tree,
        builder: &mut b,
        entries: 0,
        inodes: HashMap::new(),
    };
    d.dir(&rootfd, Some(ROOT), &[])
        .map_err(|e| io_err("cannot read the build root", &show, e))?;
    let n = d.entries;
    b.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(|e| io_err("cannot write a layer", &show, e))?;
    Ok(n)
}

struct Differ<'a, W: Write> {
    tree: &'a Tree,
    builder: &'a mut tar::Builder<W>,
    entries: u64,
    /// Host inodes written in this layer: their first path (hard links).
    inodes: HashMap<(u64, u64), Vec<u8>>,
}

impl<W: Write> Differ<'_, W> {
    /// Compares host directory `fd` (at `path`) with tree directory `id`
    /// (`None`: new, everything under it is new).
    fn dir(&mut self, fd: &OwnedFd, id: Option<NodeId>, path: &[u8]) -> io::Result<()> {
        let mut names: Vec<Vec<u8>> = Vec::new();
        let mut dir = rfs::Dir::read_from(fd)?;
        while let Some(e) = dir.read() {
            let n = e?.file_name().to_bytes().to_vec();
            if n != b"." && n != b".." {
                names.push(n);
            }
        }
        names.sort();
        let tree_dir = id.and_then(|i| self.tree.dir(i));
        // Deleted: in the tree, gone from the host.
        if let Some(td) = tree_dir {
            for e in td.entries.iter().filter(|e| e.live()) {
                if !names.contains(&e.name) && !skipped(path, &e.name) {
                    let mut wh = path.to_vec();
                    wh.extend_from_slice(b".wh.");
                    wh.extend_from_slice(&e.name);
                    let h = self.header(
                        &wh,
                        tar::EntryType::Regular,
                        0o644,
                        0,
                        0,
                        Time::default(),
                        &BTreeMap::new(),
                        0,
                        Ok,
                    )?;
                    self.builder.append(&h, io::empty())?;
                }
            }
        }
        for name in names {
            if skipped(path, &name) {
                continue;
            }
            let st = rfs::statat(fd, name.as_slice(), AtFlags::SYMLINK_NOFOLLOW)?;
            let seen = Seen {
                xattrs: xattrs_of(fd, &name)?,
                stat: st,
            };
            let old = tree_dir
                .and_then(|_| self.tree.lookup(id.expect("a tree dir has an id"), &name))
                .map(|e| e.node);
            let mut p = path.to_vec();
            p.extend_from_slice(&name);
            let kind = kind_of(&seen.stat);
            let same_kind = old.is_some_and(|o| same_kind(&self.tree.node(o).kind, kind));
            let target = if kind == FileType::Symlink {
                Some(
                    rfs::readlinkat(fd, name.as_slice(), Vec::new())?
                        .to_bytes()
                        .to_vec(),
                )
            } else {
                None
            };
            let changed =
                !same_kind || old.is_some_and(|o| self.changed(o, &seen, target.as_deref()));
            if changed {
                self.write(fd, &name, &p, &seen)?;
            }
            if kind == FileType::Directory {
                let sub = open_dir(fd, &name)?;
                p.push(b'/');
                let sub_id = if same_kind { old } else { None };
                self.dir(&sub, sub_id, &p)?;
            }
        }
        Ok(())
    }

    fn changed(&self, id: NodeId, s: &Seen, target: Option<&[u8]>) -> bool {
        let n = self.tree.node(id);
        let st = &s.stat;
        let meta = u32::from(n.meta.mode) != (st.st_mode & 0o7777)
            || n.meta.uid != st.st_uid
            || n.meta.gid != st.st_gid
            || n.meta.xattrs != s.xattrs;
        let mtime = n.meta.mtime.sec != st.st_mtime
            || i64::from(n.meta.mtime.nsec) != st.st_mtime_nsec as i64;
        match &n.kind {
            Kind::Dir(_) => meta,
            Kind::File { len, .. } => meta || mtime || *len != st.st_size as u64,
            Kind::Symlink(t) => {
                n.meta.uid != st.st_uid || n.meta.gid != st.st_gid || Some(t.as_slice()) != target
            }
            Kind::Char(ma, mi) | Kind::Block(ma, mi) => {
                meta || (rfs::major(st.st_rdev), rfs::minor(st.st_rdev)) != (*ma, *mi)
            }
            Kind::Fifo => meta,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn header(
        &mut self,
        path: &[u8],
        kind: tar::EntryType,
        mode: u32,
        uid: u32,
        gid: u32,
        mtime: Time,
        xattrs: &BTreeMap<Vec<u8>, Vec<u8>>,
        size: u64,
        f: impl FnOnce(tar::Header) -> io::Result<tar::Header>,
    ) -> io::Result<tar::Header> {
        let mut records: Vec<(String, Vec<u8>)> = xattrs
            .iter()
            .map(|(k, v)| {
                (
                    format!("SCHILY.xattr.{}", String::from_utf8_lossy(k)),
                    v.clone(),
                )
            })
            .collect();
        if mtime.nsec != 0 {
            records.push((
                "mtime".into(),
                format!("{}.{:09}", mtime.sec, mtime.nsec).into_bytes(),
            ));
        }
        if path.len() > 99 {
            records.push(("path".into(), path.to_vec()));
        }
        if !records.is_empty() {
            self.builder
                .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))?;
        }
        let mut h = tar::Header::new_ustar();
        let short = &path[..path.len().min(99)];
        h.as_old_mut().name[..short.len()].copy_from_slice(short);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(u64::from(uid));
        h.set_gid(u64::from(gid));
        h.set_mtime(mtime.sec.max(0) as u64);
        h.set_size(size);
        let mut h = f(h)?;
        h.set_cksum();
        self.entries += 1;
        Ok(h)
    }

    fn write(&mut self, fd: &OwnedFd, name: &[u8], path: &[u8], s: &Seen) -> io::Result<()> {
        let st = &s.stat;
        let mode = st.st_mode & 0o7777;
        let mtime = Time {
            sec: st.st_mtime,
            nsec: st.st_mtime_nsec as u32,
        };
        let (uid, gid) = (st.st_uid, st.st_gid);
        use tar::EntryType as T;
        match kind_of(st) {
            FileType::Directory => {
                let mut p = path.to_vec();
                p.push(b'/');
                let h = self.header(&p, T::Directory, mode, uid, gid, mtime, &s.xattrs, 0, Ok)?;
                self.builder.append(&h, io::empty())?;
            }
            FileType::RegularFile => {
                let key = (st.st_dev, st.st_ino);
                if st.st_nlink > 1 {
                    if let Some(first) = self.inodes.get(&key).cloned() {
                        let h = self.header(
                            path,
                            T::Link,
                            mode,
                            uid,
                            gid,
                            mtime,
                            &BTreeMap::new(),
                            0,
                            |mut h| {
                                h.set_link_name_literal(&first)?;
                                Ok(h)
                            },
                        )?;
                        return self.builder.append(&h, io::empty());
                    }
                    self.inodes.insert(key, path.to_vec());
                }
                let f: File = rfs::openat(
                    fd,
                    name,
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )?
                .into();
                let h = self.header(
                    path,
                    T::Regular,
                    mode,
                    uid,
                    gid,
                    mtime,
                    &s.xattrs,
                    st.st_size as u64,
                    Ok,
                )?;
                self.builder.append(&h, f.take(st.st_size as u64))?;
            }
            FileType::Symlink => {
                let target = rfs::readlinkat(fd, name, Vec::new())?;
                let target = target.to_bytes().to_vec();
                let h = self.header(path, T::Symlink, 0o777, uid, gid, mtime, &s.xattrs, 0, |mut h| {
                    if target.len() > 99 {
                        return Err(io::Error::other("symbolic link targets over 99 bytes in a RUN step are not supported"));
                    }
                    h.set_link_name_literal(&target)?;
                    Ok(h)
                })?;
                self.builder.append(&h, io::empty())?;
            }
            t @ (FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo) => {
                let kind = match t {
                    FileType::CharacterDevice => T::Char,
                    FileType::BlockDevice => T::Block,
                    _ => T::Fifo,
                };
                let (ma, mi) = (rfs::major(st.st_rdev), rfs::minor(st.st_rdev));
                let h = self.header(path, kind, mode, uid, gid, mtime, &s.xattrs, 0, |mut h| {
                    h.set_device_major(ma)?;
                    h.set_device_minor(mi)?;
                    Ok(h)
                })?;
                self.builder.append(&h, io::empty())?;
            }
            _ => {} // sockets are not image content
        }
        Ok(())
    }
}

fn same_kind(k: &Kind, t: FileType) -> bool {
    matches!(
        (k, t),
        (Kind::Dir(_), FileType::Directory)
            | (Kind::File { .. }, FileType::RegularFile)
            | (Kind::Symlink(_), FileType::Symlink)
            | (Kind::Char(..), FileType::CharacterDevice)
            | (Kind::Block(..), FileType::BlockDevice)
            | (Kind::Fifo, FileType::Fifo)
    )
}

fn skipped(dir: &[u8], name: &[u8]) -> bool {
    let mut p = dir.to_vec();
    p.extend_from_slice(name);
    NOT_OUTPUT.iter().any(|s| s.as_bytes() == p.as_slice())
}
