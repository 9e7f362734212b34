//! COPY and ADD: layers made from the build context (its `.dockerignore`
//! honoured, no path leaving it) or from an earlier stage's tree; ADD
//! unpacks local tar archives (plain, gzip, zstd).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::oci::error::OciError;
use crate::oci::tree::{Kind, NodeId, Time, Tree};

/// A layer being written: a tar of entries, and a hash of what they hold
/// (paths, modes, owners, bytes; not times) for the step cache.
pub struct LayerWriter {
    tar: tar::Builder<io::BufWriter<File>>,
    hash: Sha256,
    pub entries: u64,
}

impl LayerWriter {
    pub fn new(out: File) -> LayerWriter {
        let mut tar = tar::Builder::new(io::BufWriter::new(out));
        tar.mode(tar::HeaderMode::Complete);
        LayerWriter {
            tar,
            hash: Sha256::new(),
            entries: 0,
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        path: &str,
        kind: tar::EntryType,
        mode: u32,
        owner: (u32, u32),
        mtime: i64,
        link: Option<&[u8]>,
        data: &mut dyn Read,
        size: u64,
    ) -> io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(u64::from(owner.0));
        h.set_gid(u64::from(owner.1));
        h.set_mtime(mtime.max(0) as u64);
        h.set_size(size);
        self.hash
            .update(format!("{path}\0{kind:?}\0{mode:o}\0{owner:?}\0{size}\0").as_bytes());
        if let Some(l) = link {
            self.hash.update(l);
            self.tar.append_link(
                &mut h,
                path,
                Path::new(std::str::from_utf8(l).map_err(io::Error::other)?),
            )?;
        } else {
            let mut hashing = HashRead {
                inner: data,
                hash: &mut self.hash,
            };
            self.tar.append_data(&mut h, path, &mut hashing)?;
        }
        self.entries += 1;
        Ok(())
    }

    /// Finishes the tar; the content hash.
    pub fn finish(self) -> io::Result<String> {
        let mut w = self.tar.into_inner()?;
        w.flush()?;
        Ok(hex::encode(self.hash.finalize()))
    }
}

struct HashRead<'a> {
    inner: &'a mut dyn Read,
    hash: &'a mut Sha256,
}

impl Read for HashRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

/// `.dockerignore` patterns, in order (`!` re-includes).
pub struct Ignore(Vec<(bool, String)>);

impl Ignore {
    pub fn load(context: &Path) -> Result<Ignore, OciError> {
        let p = context.join(".dockerignore");
        let text = match std::fs::read_to_string(&p) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(OciError::io("cannot read", p, e)),
        };
        Ok(Ignore(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| match l.strip_prefix('!') {
                    Some(p) => (false, clean(p)),
                    None => (true, clean(l)),
                })
                .collect(),
        ))
    }

    /// Whether `rel` (or a directory above it) is excluded.
    pub fn excluded(&self, rel: &str) -> bool {
        let mut out = false;
        for (exclude, pat) in &self.0 {
            let hit = glob(pat.as_bytes(), rel.as_bytes())
                || rel
                    .match_indices('/')
                    .any(|(i, _)| glob(pat.as_bytes(), &rel.as_bytes()[..i]));
            if hit {
                out = *exclude;
            }
        }
        out
    }
}

fn clean(p: &str) -> String {
    p.trim_start_matches("./")
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_owned()
}

/// `*` (not `/`), `?`, `**` (anything).
fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.first() {
        None => s.is_empty(),
        Some(b'*') if p.get(1) == Some(&b'*') => {
            let rest = p[2..].strip_prefix(b"/").unwrap_or(&p[2..]);
            (0..=s.len()).any(|i| glob(rest, &s[i..]))
        }
        Some(b'*') => (0..=s.len())
            .take_while(|&i| i == 0 || s[i - 1] != b'/')
            .any(|i| glob(&p[1..], &s[i..])),
        Some(b'?') => !s.is_empty() && s[0] != b'/' && glob(&p[1..], &s[1..]),
        Some(&c) => s.first() == Some(&c) && glob(&p[1..], &s[1..]),
    }
}

/// A source path of COPY/ADD inside the context, refusing escapes.
fn context_path(context: &Path, src: &str) -> Result<PathBuf, OciError> {
    let mut depth = 0i32;
    for c in Path::new(src).components() {
        match c {
            Component::ParentDir => depth -= 1,
            Component::Normal(_) => depth += 1,
            _ => {}
        }
        if depth < 0 {
            return Err(OciError::Build(format!(
                "`{src}` leaves the build context {}: COPY and ADD take files from inside it",
                context.display()
            )));
        }
    }
    let p = context.join(src.trim_start_matches('/'));
    // Symbolic links in the path must not lead out either.
    if let (Ok(real), Ok(ctx)) = (p.canonicalize(), context.canonicalize()) {
        if !real.starts_with(&ctx) {
            return Err(OciError::Build(format!(
                "`{src}` resolves to {} outside the build context",
                real.display()
            )));
        }
    }
    Ok(p)
}

fn owner_of(chown: Option<(u32, u32)>, md: &std::fs::Metadata) -> (u32, u32) {
    let _ = md;
    chown.unwrap_or((0, 0))
}

/// Adds context files `srcs` at `dest` (absolute in the image).
pub fn add_from_context(
    w: &mut LayerWriter,
    context: &Path,
    ignore: &Ignore,
    srcs: &[String],
    dest: &str,
    chown: Option<(u32, u32)>,
    unpack: bool,
) -> Result<(), OciError> {
    let dest_is_dir = dest.ends_with('/') || srcs.len() > 1;
    for src in srcs {
        let p = context_path(context, src)?;
        let md = std::fs::symlink_metadata(&p)
            .map_err(|e| OciError::io("cannot read build context file", &p, e))?;
        let base = dest
            .trim_start_matches('/')
            .trim_end_matches('/')
            .to_owned();
        if md.is_dir() {
            walk(w, context, ignore, &p, &base, chown)?;
        } else if unpack && md.is_file() && is_archive(&p)? {
            unpack_archive(w, &p, &base, chown)?;
        } else {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let target = if dest_is_dir {
                format!("{base}/{name}")
            } else {
                base.clone()
            };
            one(w, &p, &target, chown).map_err(|e| OciError::io("cannot copy", &p, e))?;
        }
    }
    Ok(())
}

fn walk(
    w: &mut LayerWriter,
    context: &Path,
    ignore: &Ignore,
    dir: &Path,
    dest: &str,
    chown: Option<(u32, u32)>,
) -> Result<(), OciError> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| OciError::io("cannot read", dir, e))?
        .filter_map(Result::ok)
        .map(|e| e.file_name())
        .collect();
    names.sort();
    for n in names {
        let p = dir.join(&n);
        let rel = p
            .strip_prefix(context)
            .unwrap_or(&p)
            .to_string_lossy()
            .into_owned();
        if ignore.excluded(&rel) {
            continue;
        }
        let target = if dest.is_empty() {
            n.to_string_lossy().into_owned()
        } else {
            format!("{dest}/{}", n.to_string_lossy())
        };
        one(w, &p, &target, chown).map_err(|e| OciError::io("cannot copy", &p, e))?;
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            walk(w, context, ignore, &p, &target, chown)?;
        }
    }
    Ok(())
}

fn one(w: &mut LayerWriter, p: &Path, target: &str, chown: Option<(u32, u32)>) -> io::Result<()> {
    let md = std::fs::symlink_metadata(p)?;
    let mode = md.permissions().mode() & 0o7777;
    let owner = owner_of(chown, &md);
    let ft = md.file_type();
    if ft.is_dir() {
        w.entry(
            &format!("{target}/"),
            tar::EntryType::Directory,
            mode,
            owner,
            md.mtime(),
            None,
            &mut io::empty(),
            0,
        )
    } else if ft.is_symlink() {
        let l = std::fs::read_link(p)?;
        w.entry(
            target,
            tar::EntryType::Symlink,
            0o777,
            owner,
            md.mtime(),
            Some(l.as_os_str().as_encoded_bytes()),
            &mut io::empty(),
            0,
        )
    } else if ft.is_file() {
        let mut f = File::open(p)?;
        w.entry(
            target,
            tar::EntryType::Regular,
            mode,
            owner,
            md.mtime(),
            None,
            &mut f,
            md.len(),
        )
    } else {
        Ok(()) // devices, sockets: not from a build context
    }
}

fn is_archive(p: &Path) -> Result<bool, OciError> {
    let mut head = [0u8; 512];
    let n = File::open(p)
        .and_then(|mut f| f.read(&mut head))
        .map_err(|e| OciError::io("cannot read", p, e))?;
    Ok(head[..n].starts_with(&[0x1f, 0x8b])
        || head[..n].starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
        || (n >= 262 && &head[257..262] == b"ustar"))
}

fn unpack_archive(
    w: &mut LayerWriter,
    p: &Path,
    dest: &str,
    chown: Option<(u32, u32)>,
) -> Result<(), OciError> {
    let bad = |e: io::Error| OciError::Build(format!("ADD {}: {e}", p.display()));
    let mut f = BufReader::new(File::open(p).map_err(|e| OciError::io("cannot open", p, e))?);
    let head = f.fill_buf().map_err(bad)?.to_vec();
    let r: Box<dyn Read> = if head.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::GzDecoder::new(f))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(zstd::stream::read::Decoder::with_buffer(f).map_err(bad)?)
    } else {
        Box::new(f)
    };
    let mut ar = tar::Archive::new(r);
    for e in ar.entries().map_err(bad)? {
        let mut e = e.map_err(bad)?;
        let path = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        if path.starts_with('/') || path.split('/').any(|c| c == "..") {
            return Err(OciError::Build(format!(
                "ADD {}: entry `{path}` leaves its destination",
                p.display()
            )));
        }
        let target = format!("{dest}/{}", path.trim_start_matches("./"));
        let h = e.header().clone();
        let owner = chown.unwrap_or((h.uid().unwrap_or(0) as u32, h.gid().unwrap_or(0) as u32));
        let link = e.link_name_bytes().map(|l| l.into_owned());
        let kind = h.entry_type();
        let size = e.size();
        let mode = h.mode().unwrap_or(0o644);
        let mtime = h.mtime().unwrap_or(0) as i64;
        w.entry(
            target.trim_end_matches('/'),
            kind,
            mode,
            owner,
            mtime,
            link.as_deref()
                .filter(|_| kind.is_symlink() || kind.is_hard_link()),
            &mut e,
            if kind.is_file() { size } else { 0 },
        )
        .map_err(bad)?;
    }
    Ok(())
}

/// Adds what `src` names in an earlier stage's tree at `dest`.
pub fn add_from_tree(
    w: &mut LayerWriter,
    tree: &Tree,
    spool: &File,
    src: &str,
    dest: &str,
    dest_is_dir: bool,
    chown: Option<(u32, u32)>,
) -> Result<(), OciError> {
    let comps: Vec<&[u8]> = src
        .split('/')
        .filter(|c| !c.is_empty() && *c != ".")
        .map(str::as_bytes)
        .collect();
    if comps.contains(&&b".."[..]) {
        return Err(OciError::Build(format!(
            "COPY --from: `{src}` may not contain .."
        )));
    }
    let missing = || OciError::Build(format!("COPY --from: `{src}` does not exist in that stage"));
    let id = match comps.split_last() {
        None => crate::oci::tree::ROOT,
        Some((last, parents)) => {
            let d = tree.find_dir(parents).map_err(|_| missing())?;
            tree.lookup(d, last).ok_or_else(missing)?.node
        }
    };
    let base = dest
        .trim_start_matches('/')
        .trim_end_matches('/')
        .to_owned();
    let io_err = |e: io::Error| OciError::Build(format!("COPY --from {src}: {e}"));
    if tree.node(id).is_dir() {
        copy_node_children(w, tree, spool, id, &base, chown).map_err(io_err)
    } else {
        let name = comps
            .last()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .unwrap_or_default();
        let target = if dest_is_dir {
            format!("{base}/{name}")
        } else {
            base
        };
        copy_node(w, tree, spool, id, &target, chown).map_err(io_err)
    }
}

fn copy_node_children(
    w: &mut LayerWriter,
    tree: &Tree,
    spool: &File,
    dir: NodeId,
    base: &str,
    chown: Option<(u32, u32)>,
) -> io::Result<()> {
    let Some(d) = tree.dir(dir) else {
        return Ok(());
    };
    let mut entries: BTreeMap<Vec<u8>, NodeId> = BTreeMap::new();
    for e in d.entries.iter().filter(|e| e.live()) {
        entries.insert(e.name.clone(), e.node);
    }
    for (name, id) in entries {
        let n = String::from_utf8_lossy(&name);
        let target = if base.is_empty() {
            n.into_owned()
        } else {
            format!("{base}/{n}")
        };
        copy_node(w, tree, spool, id, &target, chown)?;
        if tree.node(id).is_dir() {
            copy_node_children(w, tree, spool, id, &target, chown)?;
        }
    }
    Ok(())
}

fn copy_node(
    w: &mut LayerWriter,
    tree: &Tree,
    spool: &File,
    id: NodeId,
    target: &str,
    chown: Option<(u32, u32)>,
) -> io::Result<()> {
    let n = tree.node(id);
    let owner = chown.unwrap_or((n.meta.uid, n.meta.gid));
    let mode = u32::from(n.meta.mode);
    let Time { sec, .. } = n.meta.mtime;
    match &n.kind {
        Kind::Dir(_) => w.entry(
            &format!("{target}/"),
            tar::EntryType::Directory,
            mode,
            owner,
            sec,
            None,
            &mut io::empty(),
            0,
        ),
        Kind::File { offset, len } => {
            let mut r = SpoolRange {
                f: spool,
                at: *offset,
                end: offset + len,
            };
            w.entry(
                target,
                tar::EntryType::Regular,
                mode,
                owner,
                sec,
                None,
                &mut r,
                *len,
            )
        }
        Kind::Symlink(t) => w.entry(
            target,
            tar::EntryType::Symlink,
            0o777,
            owner,
            sec,
            Some(t),
            &mut io::empty(),
            0,
        ),
        _ => Ok(()),
    }
}

struct SpoolRange<'a> {
    f: &'a File,
    at: u64,
    end: u64,
}

impl Read for SpoolRange<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        let n = buf.len().min((self.end - self.at) as usize);
        if n == 0 {
            return Ok(0);
        }
        let got = self.f.read_at(&mut buf[..n], self.at)?;
        self.at += got as u64;
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(b"*.md", b"README.md"));
        assert!(!glob(b"*.md", b"docs/README.md"));
        assert!(glob(b"**/*.md", b"docs/a/README.md"));
        assert!(glob(b"target", b"target"));
        let ig = Ignore(vec![
            (true, "target".into()),
            (true, "*.log".into()),
            (false, "keep.log".into()),
        ]);
        assert!(ig.excluded("target/x/y"));
        assert!(ig.excluded("a.log"));
        assert!(!ig.excluded("keep.log"));
        assert!(!ig.excluded("src/main.rs"));
    }

    #[test]
    fn context_escapes_are_refused() {
        let d = tempfile::tempdir().unwrap();
        assert!(context_path(d.path(), "../x").is_err());
        assert!(context_path(d.path(), "a/../../x").is_err());
        assert!(context_path(d.path(), "a/../b").is_ok());
    }
}
