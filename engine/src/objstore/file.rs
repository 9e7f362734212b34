//! `file://DIR`: objects as files under a directory.
//!
//! Writes go to a temporary file that is synced and then linked into place
//! (a hard link fails if the target exists, which makes "put if absent"
//! atomic), so a reader never sees a partial object and a crash leaves at
//! worst a stray file in `.tmp/`.

use std::fs::{self, File};
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::Bytes;

use super::{check_key, ObjectStore, PutMode, PutOutcome, StoreError};
use crate::error::ErrorKind;

const TMP_DIR: &str = ".tmp";

#[derive(Debug, Clone)]
pub struct FileStore {
    root: PathBuf,
    uri: String,
}

impl FileStore {
    /// Opens (creating if needed) the store rooted at `root`.
    pub fn open(root: &Path) -> io::Result<FileStore> {
        fs::create_dir_all(root.join(TMP_DIR))?;
        let root = root.canonicalize()?;
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
        Ok(self.root.join(key))
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

    fn tmp_path(&self) -> PathBuf {
        self.root
            .join(TMP_DIR)
            .join(format!("{:016x}", fastrand::u64(..)))
    }

    /// Links a synced temporary file into place and syncs the directory.
    fn install(&self, tmp: &Path, dest: &Path, mode: PutMode) -> io::Result<PutOutcome> {
        let parent = dest.parent().expect("keys have a parent under root");
        fs::create_dir_all(parent)?;
        let outcome = match mode {
            PutMode::Overwrite => {
                fs::rename(tmp, dest)?;
                PutOutcome::Created
            }
            PutMode::IfAbsent => {
                let linked = fs::hard_link(tmp, dest);
                fs::remove_file(tmp)?;
                match linked {
                    Ok(()) => PutOutcome::Created,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        PutOutcome::AlreadyExisted
                    }
                    Err(e) => return Err(e),
                }
            }
        };
        File::open(parent)?.sync_all()?;
        Ok(outcome)
    }

    fn put_sync(&self, dest: &Path, data: &[u8], mode: PutMode) -> io::Result<PutOutcome> {
        if mode == PutMode::IfAbsent && dest.exists() {
            return Ok(PutOutcome::AlreadyExisted);
        }
        let tmp = self.tmp_path();
        let mut f = File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        self.install(&tmp, dest, mode)
    }

    fn put_file_sync(&self, dest: &Path, src: &Path) -> io::Result<PutOutcome> {
        if dest.exists() {
            return Ok(PutOutcome::AlreadyExisted);
        }
        let tmp = self.tmp_path();
        fs::copy(src, &tmp)?;
        File::open(&tmp)?.sync_all()?;
        self.install(&tmp, dest, PutMode::IfAbsent)
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
                let rel = path
                    .strip_prefix(&self.root)
                    .expect("walk stays under root")
                    .to_string_lossy()
                    .into_owned();
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
            this.put_sync(&path, &data, mode)
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

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path_of("delete", key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io_err("delete", key)(e)),
        }
    }
}
