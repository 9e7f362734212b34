//! From global options to an open store: the runtime, the object store and
//! the chunk store with its local cache.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context as _, Result};
use cairn_engine::chunkstore::{ChunkStore, ChunkStoreConfig};
use cairn_engine::objstore::{open_store, ObjectStore, StoreUri};
use tokio::runtime::Runtime;

use crate::cli::Global;

pub struct Context {
    pub rt: Runtime,
    pub remote: Arc<dyn ObjectStore>,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    pub readahead: u64,
    pub json: bool,
    /// The catalog project (checked).
    pub project: String,
    /// Who this is, in catalog records: `HOST:PID`.
    pub host: String,
}

/// This host's name, for the catalog's records of who did what.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}

fn default_store() -> Result<String> {
    let Some(data) = dirs::data_dir() else {
        bail!("no user data directory is known here: pass --store file:///DIR or set CAIRN_STORE");
    };
    Ok(format!(
        "file://{}",
        data.join("cairn").join("store").display()
    ))
}

fn default_cache_dir(uri: &StoreUri) -> Result<PathBuf> {
    match uri {
        StoreUri::File(root) => Ok(root.join(".cache")),
        StoreUri::S3(o) => {
            let Some(base) = dirs::cache_dir() else {
                bail!("no user cache directory is known here: pass --cache-dir DIR");
            };
            let tag: String = format!("{}-{}", o.bucket, o.prefix)
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || c == '-' {
                        c
                    } else {
                        '_'
                    }
                })
                .collect();
            Ok(base.join("cairn").join(tag))
        }
    }
}

impl Context {
    pub fn new(g: &Global) -> Result<Context> {
        let text = match &g.store {
            Some(s) => s.clone(),
            None => default_store()?,
        };
        let uri: StoreUri = text.parse()?;
        cairn_engine::catalog::check_project(&g.project).context("--project")?;
        let cache_dir = match &g.cache_dir {
            Some(d) => d.clone(),
            None => default_cache_dir(&uri)?,
        };
        let (cache_size, readahead) = (g.cache_size, g.readahead);
        let threads = std::thread::available_parallelism()
            .map_or(2, |n| n.get())
            .max(2);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let remote = rt.block_on(open_store(&uri))?;
        Ok(Context {
            rt,
            remote,
            cache_dir,
            cache_size,
            readahead,
            json: g.json,
            project: g.project.clone(),
            host: format!("{}:{}", host_name(), std::process::id()),
        })
    }

    /// The chunk store with its cache; loads the store's pack indexes.
    pub fn chunk_store(&self) -> Result<ChunkStore> {
        let mut cfg = ChunkStoreConfig::new(self.cache_dir.clone(), self.cache_size);
        cfg.readahead_budget = self.readahead;
        self.rt
            .block_on(ChunkStore::open(self.remote.clone(), cfg))
            .with_context(|| {
                format!(
                    "opening store {} with cache {}",
                    self.remote.uri(),
                    self.cache_dir.display()
                )
            })
    }

    pub fn staging_dir(&self) -> PathBuf {
        self.cache_dir.join("staging")
    }
}
