//! `file://DIR`: objects as files under a directory.
//!
//! Writes go to a temporary file in `.tmp/` (`tempfile`'s, removed if the
//! write fails) that is synced and then moved into place: put if absent
//! with `persist_noclobber` (a link that fails if the target exists, which
//! makes it atomic), overwrite with a rename. A reader never sees a partial
//! object; a crash leaves at worst a stray file in `.tmp/`, which opening
//! the store deletes once it is an hour old (a live writer's is younger).
//!
//! Conditional writes ([`ObjectStore::put_if`]), overwrites and deletes
//! hold an exclusive `flock` on one of 256 lock files in `.locks/` (the
//! key's shard), so they are atomic between the processes of a host; a
//! version is a digest of the object's bytes. (Hosts that share the
//! directory over a network filesystem get whatever its `flock` gives.)
//!
//! Keys under [`FAN_OUT_PREFIXES`] (the catalog, which may hold millions
//! of records in one collection) are stored in a trie of directories named
//! by the first characters of their last segment: `catalog/x/abcd` is the
//! file `catalog/x/@a/@b/@c/abcd`. `@` is not a key character, so the
//! directories never collide with keys, and a page of a listing in key
//! order reads only the directories its keys are in, however many keys
//! the collection holds.

use std::fs::{self, File};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;
use tempfile::NamedTempFile;

use super::{
    check_key, Conditional, ListPage, ObjectStore, Precondition, PutMode, PutOutcome, StoreError,
    Version, Versioned, MAX_PAGE,
};
use crate::error::ErrorKind;

const TMP_DIR: &str = ".tmp";
/// A temporary file older than this was left by a writer that died.
const STALE_TMP: std::time::Duration = std::time::Duration::from_secs(3600);

/// Deletes what writers that died left in `.tmp/` (best effort: a store
/// that cannot be swept still works).
fn sweep_stale_temporaries(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_some_and(|age| age > STALE_TMP);
        if old {
            if let Err(e) = fs::remove_file(entry.path()) {
                tracing::debug!(path = %entry.path().display(), error = %e, "cannot remove a stale temporary file");
            }
        }
    }
}
const LOCK_DIR: &str = ".locks";
/// Key prefixes whose last segment is fanned out into a trie.
pub const FAN_OUT_PREFIXES: &[&str] = &["catalog/"];
/// Characters of the last segment that name trie levels.
const FAN_OUT_DEPTH: usize = 3;

#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
    uri: String,
}

impl FileStore {
    /// Opens (creating if needed) the store rooted at `root`.
    pub fn open(root: &Path) -> io::Result<FileStore> {
        fs::create_dir_all(root.join(TMP_DIR))?;
        fs::create_dir_all(root.join(LOCK_DIR))?;
        let root = root.canonicalize()?;
        sweep_stale_temporaries(&root.join(TMP_DIR));
        Ok(FileStore {
            uri: format!("file://{}", root.display()),
            root,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path_of(&self, op: &'static str, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key).map_err(|m| self.err(op, key, ErrorKind::InvalidInput, m))?;
        Ok(self.root.join(stored_path(key)))
    }

    /// Holds the exclusive lock of `key`'s shard until the guard drops.
    fn lock(&self, key: &str) -> io::Result<File> {
        let shard = blake3::hash(key.as_bytes()).as_bytes()[0];
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.root.join(LOCK_DIR).join(format!("{shard:02x}")))?;
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)?;
        Ok(f)
    }

    fn err(
        &self,
        op: &'static str,
        key: &str,
        kind: ErrorKind,
        detail: impl Into<String>,
    ) -> StoreError {
        StoreError::new(op, &self.uri, key, kind, detail)
    }

    fn io_err(&self, op: &'static str, key: &str) -> impl FnOnce(io::Error) -> StoreError + '_ {
        let key = key.to_owned();
        move |e| {
            let kind = match e.kind() {
                io::ErrorKind::NotFound => ErrorKind::NotFound,
                io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
                io::ErrorKind::InvalidInput => ErrorKind::InvalidInput,
                _ => ErrorKind::Io,
            };
            self.err(op, &key, kind, e.to_string()).with_source(e)
        }
    }

    /// Moves a synced temporary file into place and syncs the directory.
    fn install(&self, tmp: NamedTempFile, dest: &Path, mode: PutMode) -> io::Result<PutOutcome> {
        let parent = dest.parent().expect("keys have a parent under root");
        fs::create_dir_all(parent)?;
        let outcome = match mode {
            PutMode::Overwrite => {
                tmp.persist(dest)?;
                PutOutcome::Created
            }
            PutMode::IfAbsent => match tmp.persist_noclobber(dest) {
                Ok(_) => PutOutcome::Created,
                // Dropping the temporary file deletes it.
                Err(e) if e.error.kind() == io::ErrorKind::AlreadyExists => {
                    PutOutcome::AlreadyExisted
                }
                Err(e) => return Err(e.error),
            },
        };
        File::open(parent)?.sync_all()?;
        Ok(outcome)
    }

    /// A new temporary file in `.tmp/`, deleted when dropped unless it is
    /// installed.
    fn tmp_file(&self) -> io::Result<NamedTempFile> {
        NamedTempFile::new_in(self.root.join(TMP_DIR))
    }

    fn put_sync(
        &self,
        key: &str,
        dest: &Path,
        data: &[u8],
        mode: PutMode,
    ) -> io::Result<PutOutcome> {
        if mode == PutMode::IfAbsent && dest.exists() {
            return Ok(PutOutcome::AlreadyExisted);
        }
        // Content-addressed creates need no lock (a link is atomic);
        // overwrites must not slip between a conditional write's check
        // and its rename.
        let _lock = match mode {
            PutMode::Overwrite => Some(self.lock(key)?),
            PutMode::IfAbsent => None,
        };
        let tmp = self.write_tmp(data)?;
        self.install(tmp, dest, mode)
    }

    fn write_tmp(&self, data: &[u8]) -> io::Result<NamedTempFile> {
        let mut tmp = self.tmp_file()?;
        tmp.write_all(data)?;
        tmp.as_file().sync_all()?;
        Ok(tmp)
    }

    fn put_if_sync(
        &self,
        key: &str,
        dest: &Path,
        data: &[u8],
        precondition: &Precondition,
    ) -> io::Result<Conditional> {
        let _lock = self.lock(key)?;
        let holds = match precondition {
            Precondition::Absent => !dest.exists(),
            Precondition::Matches(want) => match fs::read(dest) {
                Ok(current) => version_of(&current) == *want,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(e),
            },
        };
        if !holds {
            return Ok(Conditional::PreconditionFailed);
        }
        let tmp = self.write_tmp(data)?;
        let mode = match precondition {
            Precondition::Absent => PutMode::IfAbsent,
            Precondition::Matches(_) => PutMode::Overwrite,
        };
        Ok(match self.install(tmp, dest, mode)? {
            PutOutcome::Created => Conditional::Written(version_of(data)),
            PutOutcome::AlreadyExisted => Conditional::PreconditionFailed,
        })
    }

    fn put_file_sync(&self, dest: &Path, src: &Path) -> io::Result<PutOutcome> {
        if dest.exists() {
            return Ok(PutOutcome::AlreadyExisted);
        }
        let mut tmp = self.tmp_file()?;
        io::copy(&mut File::open(src)?, tmp.as_file_mut())?;
        tmp.as_file().sync_all()?;
        self.install(tmp, dest, PutMode::IfAbsent)
    }

    fn list_sync(&self, prefix: &str) -> io::Result<Vec<String>> {
        // Walk only the directory the prefix names, then filter.
        let dir_part = prefix.rfind('/').map_or("", |i| &prefix[..i]);
        let mut keys = Vec::new();
        let mut stack = vec![self.root.join(dir_part)];
        while let Some(dir) = stack.pop() {
            let entries = match fs::read_dir(&dir) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                let path = entry.path();
                let rel = key_of(
                    path.strip_prefix(&self.root)
                        .expect("walk stays under root"),
                );
                // Dot names are the store's own (temporaries, a local cache).
                if entry.file_name().to_string_lossy().starts_with('.') {
                    continue;
                }
                if entry.file_type()?.is_dir() {
                    stack.push(path);
                } else if rel.starts_with(prefix) {
                    keys.push(rel);
                }
            }
        }
        keys.sort();
        Ok(keys)
    }

    fn list_page_sync(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> io::Result<ListPage> {
        let limit = limit.clamp(1, MAX_PAGE);
        let dir_part = &prefix[..prefix.rfind('/').map_or(0, |i| i + 1)];
        let fanned = FAN_OUT_PREFIXES
            .iter()
            .any(|p| dir_part.len() > p.len() && dir_part.starts_with(p));
        if fanned {
            let after = match start_after {
                Some(a) if a.starts_with(dir_part) => Some(&a[dir_part.len()..]),
                Some(a) if a > dir_part => return Ok(ListPage::default()),
                _ => None,
            };
            let mut walk = TrieWalk {
                dir_key: dir_part,
                want: &prefix[dir_part.len()..],
                after,
                limit,
                keys: Vec::new(),
            };
            let mut node = String::new();
            if walk.visit(&self.root.join(dir_part), &mut node)? {
                let truncated = walk.keys.len() > limit;
                walk.keys.truncate(limit);
                return Ok(ListPage {
                    keys: walk.keys,
                    truncated,
                });
            }
        }
        // Anywhere else (packs, manifests: listed whole anyway): all, then cut.
        let mut keys: Vec<String> = self
            .list_sync(prefix)?
            .into_iter()
            .filter(|k| start_after.is_none_or(|a| k.as_str() > a))
            .take(limit + 1)
            .collect();
        let truncated = keys.len() > limit;
        keys.truncate(limit);
        Ok(ListPage { keys, truncated })
    }
}

/// A digest of an object's bytes: its version on `file://`.
fn version_of(data: &[u8]) -> Version {
    Version(blake3::hash(data).to_hex()[..32].to_owned())
}

/// Where a key's file is, relative to the root (see the module docs).
fn stored_path(key: &str) -> PathBuf {
    if !FAN_OUT_PREFIXES.iter().any(|p| key.starts_with(p)) {
        return PathBuf::from(key);
    }
    let (dir, leaf) = key
        .rsplit_once('/')
        .expect("fanned-out keys have a directory");
    let mut path = PathBuf::from(dir);
    for c in leaf.chars().take(FAN_OUT_DEPTH) {
        path.push(format!("@{c}"));
    }
    path.push(leaf);
    path
}

/// The key a path relative to the root stores (trie levels dropped).
fn key_of(rel: &Path) -> String {
    rel.iter()
        .map(|c| c.to_string_lossy())
        .filter(|c| !c.starts_with('@'))
        .collect::<Vec<_>>()
        .join("/")
}

/// A page of keys, in order, from one fanned-out directory's trie.
struct TrieWalk<'a> {
    dir_key: &'a str,
    /// The page's keys start with this (after `dir_key`).
    want: &'a str,
    /// The page starts after this last segment.
    after: Option<&'a str>,
    limit: usize,
    /// Up to `limit + 1` keys (one more says the page is truncated).
    keys: Vec<String>,
}

impl TrieWalk<'_> {
    /// Visits the trie node `node` (the leading characters its keys share)
    /// in `dir`. `Ok(false)`: the directory holds more than a trie (plain
    /// subdirectories), so the caller lists another way.
    fn visit(&mut self, dir: &Path, node: &mut String) -> io::Result<bool> {
        let entries = match fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
            Err(e) => return Err(e),
        };
        let (mut files, mut levels) = (Vec::new(), Vec::new());
        for entry in entries {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dir = entry.file_type()?.is_dir();
            match name.strip_prefix('@') {
                Some(c) if is_dir => levels.push(c.to_owned()),
                _ if name.starts_with('.') => {}
                _ if is_dir => return Ok(false),
                _ => files.push(name),
            }
        }
        // A key that is exactly this node sorts before every longer one.
        files.sort();
        for f in files {
            if f.starts_with(self.want) && self.after.is_none_or(|a| f.as_str() > a) {
                self.keys.push(format!("{}{f}", self.dir_key));
                if self.keys.len() > self.limit {
                    return Ok(true);
                }
            }
        }
        levels.sort();
        for c in levels {
            let len = node.len();
            node.push_str(&c);
            let wanted = node.starts_with(self.want) || self.want.starts_with(node.as_str());
            let after_start = self.after.is_none_or(|a| {
                let n = node.len().min(a.len());
                node.as_bytes()[..n] >= a.as_bytes()[..n]
            });
            if wanted && after_start && !self.visit(&dir.join(format!("@{c}")), node)? {
                return Ok(false);
            }
            node.truncate(len);
            if self.keys.len() > self.limit {
                break;
            }
        }
        Ok(true)
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("blocking object-store task panicked")
}

#[async_trait]
impl ObjectStore for FileStore {
    fn uri(&self) -> &str {
        &self.uri
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes, StoreError> {
        let path = self.path_of("get", key)?;
        let this = self.clone();
        let key = key.to_owned();
        blocking(move || {
            let f = File::open(&path).map_err(this.io_err("get", &key))?;
            let len = f.metadata().map_err(this.io_err("get", &key))?.len();
            let range = range.unwrap_or(0..len);
            if range.start > range.end || range.end > len {
                return Err(this.err(
                    "get",
                    &key,
                    ErrorKind::InvalidInput,
                    format!("range {range:?} is outside the object's {len} bytes"),
                ));
            }
            let mut buf = vec![0u8; (range.end - range.start) as usize];
            f.read_exact_at(&mut buf, range.start)
                .map_err(this.io_err("get", &key))?;
            Ok(Bytes::from(buf))
        })
        .await
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<PutOutcome, StoreError> {
        let path = self.path_of("put", key)?;
        let this = self.clone();
        let key = key.to_owned();
        blocking(move || {
            this.put_sync(&key, &path, &data, mode)
                .map_err(this.io_err("put", &key))
        })
        .await
    }

    async fn put_file(&self, key: &str, src: &Path) -> Result<PutOutcome, StoreError> {
        let path = self.path_of("put", key)?;
        let this = self.clone();
        let key = key.to_owned();
        let src = src.to_owned();
        blocking(move || {
            this.put_file_sync(&path, &src)
                .map_err(this.io_err("put", &key))
        })
        .await
    }

    async fn head(&self, key: &str) -> Result<Option<u64>, StoreError> {
        let path = self.path_of("head", key)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) if m.is_file() => Ok(Some(m.len())),
            Ok(_) => Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err("head", key)(e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let this = self.clone();
        let p = prefix.to_owned();
        blocking(move || this.list_sync(&p).map_err(this.io_err("list", &p))).await
    }

    async fn get_versioned(&self, key: &str) -> Result<Option<Versioned>, StoreError> {
        let path = self.path_of("get", key)?;
        match tokio::fs::read(&path).await {
            Ok(data) => Ok(Some(Versioned {
                version: version_of(&data),
                data: Bytes::from(data),
            })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io_err("get", key)(e)),
        }
    }

    async fn put_if(
        &self,
        key: &str,
        data: Bytes,
        precondition: Precondition,
    ) -> Result<Conditional, StoreError> {
        let path = self.path_of("put", key)?;
        let this = self.clone();
        let key = key.to_owned();
        blocking(move || {
            this.put_if_sync(&key, &path, &data, &precondition)
                .map_err(this.io_err("put", &key))
        })
        .await
    }

    async fn list_page(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> Result<ListPage, StoreError> {
        let this = self.clone();
        let p = prefix.to_owned();
        let after = start_after.map(str::to_owned);
        blocking(move || {
            this.list_page_sync(&p, after.as_deref(), limit)
                .map_err(this.io_err("list", &p))
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of("delete", key)?;
        let this = self.clone();
        let key = key.to_owned();
        blocking(move || {
            let _lock = this.lock(&key).map_err(this.io_err("delete", &key))?;
            match fs::remove_file(&path) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(this.io_err("delete", &key)(e)),
            }
        })
        .await
    }
}
