//! One collection run: lease, mark, plan, rewrite, condemn, delete.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::homes::Mark;
use super::hosts;
use super::plan::{self, Marked, Rewrite, Rules};
use super::roots;
use super::spill;
use super::state::{self, now_ms, Condemned, Lease};
use super::GcError;
use crate::catalog::{self, CatalogError};
use crate::frame::{self, Verify};
use crate::id::ManifestId;
use crate::layout;
use crate::locate;
use crate::objstore::ObjectStore;
use crate::pack::{self, PackIndex, PackWriter};

/// New packs written by a rewrite are closed at this size.
const REWRITE_PACK_TARGET: u64 = 32 << 20;
/// Frames of one sparse pack read per GET: adjacent ones merged across
/// gaps of up to this many bytes.
const MERGE_GAP: u64 = 64 << 10;
/// A run stops deleting when less than this is left of its lease.
const LEASE_MARGIN: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct GcOptions {
    /// How long an object stays condemned before it may be deleted.
    pub grace: Duration,
    /// Rewrite packs whose live frames are less than this share.
    pub rewrite_below: f64,
    pub dry_run: bool,
    /// Who runs it (`host:pid`), for the lease.
    pub by: String,
    /// How long the lease lasts (a run must end within it).
    pub lease: Duration,
    /// Where rewritten packs are built.
    pub staging_dir: PathBuf,
    /// Local copies of pack indexes (a chunk cache's `indexes/`).
    pub index_dir: PathBuf,
    /// Hosts gone for good whose roots are deleted before the mark.
    pub forget_hosts: Vec<String>,
    /// A host may be forgotten only when its roots are older than this.
    pub host_timeout: Duration,
}

impl GcOptions {
    pub fn new(by: String, staging_dir: PathBuf, index_dir: PathBuf) -> GcOptions {
        GcOptions {
            grace: Duration::from_secs(3600),
            rewrite_below: 0.5,
            dry_run: false,
            by,
            lease: Duration::from_secs(3600),
            staging_dir,
            index_dir,
            forget_hosts: Vec::new(),
            host_timeout: hosts::HEARTBEAT * 3,
        }
    }
}

/// What a run found and did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub grace_secs: u64,
    /// Catalog records read as roots.
    pub roots: u64,
    pub live_manifests: u64,
    pub live_chunks: u64,
    /// Manifests a root names that are not in the store.
    pub missing_manifests: u64,
    /// Live chunks no pack holds.
    pub missing_chunks: u64,
    pub packs: u64,
    pub pack_bytes: u64,
    /// Frame bytes of the live chunks' homes.
    pub live_bytes: u64,
    /// Found unreferenced by this run (deleted by a later one).
    pub condemned: u64,
    pub condemned_bytes: u64,
    /// Condemned earlier, still unreferenced, within the grace period.
    pub waiting: u64,
    pub waiting_bytes: u64,
    /// Taken off the condemned list: referenced again.
    pub uncondemned: u64,
    /// Objects deleted (a pack and its index count once).
    pub deleted: u64,
    pub deleted_packs: u64,
    pub reclaimed_bytes: u64,
    /// Sparse packs whose live frames were copied into new packs.
    pub packs_rewritten: u64,
    pub bytes_copied: u64,
    /// Every host whose roots were read.
    pub hosts: Vec<roots::HostSeen>,
    /// Hosts whose roots this run deleted (a dry run: would delete).
    pub forgotten_hosts: Vec<String>,
    pub seconds: f64,
}

/// Runs one collection over `store`. `progress` is told each phase.
pub async fn run(
    store: &dyn ObjectStore,
    opts: &GcOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<GcReport, GcError> {
    let started = std::time::Instant::now();
    if !opts.dry_run {
        take_lease(store, opts).await?;
    }
    let result = leased(store, opts, progress).await;
    if !opts.dry_run {
        // On failure the lease is given back too: what was decided is in
        // the state, and the next run finishes it.
        let released = state::update::<GcError>(store, |s| {
            let ours = s.lease.as_ref().is_some_and(|l| l.by == opts.by);
            if ours {
                s.lease = None;
            }
            Ok(ours)
        })
        .await;
        if let (Ok(_), Err(e)) = (&result, released) {
            return Err(e);
        }
    }
    let mut report = result?;
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

async fn take_lease(store: &dyn ObjectStore, opts: &GcOptions) -> Result<(), GcError> {
    state::update(store, |s| {
        let now = now_ms();
        if let Some(l) = s
            .lease
            .as_ref()
            .filter(|l| l.until_ms > now && l.by != opts.by)
        {
            return Err(GcError::Busy {
                by: l.by.clone(),
                secs_left: (l.until_ms - now).div_ceil(1000),
            });
        }
        s.lease = Some(Lease {
            by: opts.by.clone(),
            until_ms: now + opts.lease.as_millis() as u64,
        });
        s.grace_secs = opts.grace.as_secs();
        Ok(true)
    })
    .await?;
    Ok(())
}

async fn leased(
    store: &dyn ObjectStore,
    opts: &GcOptions,
    progress: &(dyn Fn(&str) + Sync),
) -> Result<GcReport, GcError> {
    let (state, _) = state::load(store).await?;
    let mark_ms = now_ms();
    let mut report = GcReport {
        dry_run: opts.dry_run,
        grace_secs: opts.grace.as_secs(),
        ..GcReport::default()
    };
    let mut forgotten = std::collections::BTreeSet::new();
    for host in &opts.forget_hosts {
        let key = hosts::key(host);
        let found = hosts::read(store, &key).await?;
        hosts::check_forgettable(host, found.as_ref(), state::now_secs(), opts.host_timeout)?;
        if !opts.dry_run {
            store.delete(&key).await?;
            tracing::info!(host = %host, "forgot a host's roots");
        }
        forgotten.insert(key);
        report.forgotten_hosts.push(host.clone());
    }
    let mut roots = roots::collect(store, &forgotten, progress).await?;
    report.roots = roots.records;
    report.hosts = std::mem::take(&mut roots.hosts);
    progress("manifests");
    // The chunk ids and pack entries go to disk, not to memory.
    let spill_dir =
        spill::scratch_dir(&opts.staging_dir, "gc-mark-").map_err(|source| GcError::Staging {
            path: opts.staging_dir.clone(),
            source,
        })?;
    let spill_err = |source| GcError::Staging {
        path: spill_dir.path().to_owned(),
        source,
    };
    let mut mark = Mark::new(spill_dir.path());
    let mut live_manifests: HashSet<ManifestId> = HashSet::new();
    for id in &roots.manifests {
        match catalog::load_manifest(store, id).await {
            Ok(m) => {
                for c in m.chunks.iter().flatten() {
                    mark.live(c).map_err(spill_err)?;
                }
                live_manifests.insert(*id);
            }
            Err(CatalogError::NoSuchManifest { .. }) => {
                tracing::warn!(manifest = %id, "a catalog record names a manifest that is not in the store (`cairn verify` says which)");
                report.missing_manifests += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    report.live_manifests = live_manifests.len() as u64;

    progress("packs");
    let keys = store.list(layout::PACKS).await?;
    let listed: HashSet<&str> = keys.iter().map(String::as_str).collect();
    let mut packs = 0u64;
    let mut dead_objects: Vec<(String, u64)> = Vec::new();
    for key in &keys {
        if let Some(pack) = layout::pack_of_index_key(key) {
            if listed.contains(layout::pack_key(&pack).as_str()) {
                let index = locate::load_index(store, &opts.index_dir, key, pack).await?;
                mark.pack(&index).map_err(spill_err)?;
                packs += 1;
            }
        } else if let Some(pack) = layout::pack_of_key(key) {
            // A pack with no index: an upload cut short (or under way: the
            // grace period covers it).
            if !listed.contains(layout::pack_index_key(&pack).as_str()) {
                dead_objects.push((key.clone(), 0));
            }
        }
    }
    report.packs = packs;
    progress("other objects");
    let live_keys = |key: &str| -> bool {
        if let Some(id) = key
            .strip_prefix(layout::MANIFESTS)
            .or_else(|| key.strip_prefix(layout::WORKING_SETS))
        {
            return id
                .parse::<ManifestId>()
                .is_ok_and(|id| live_manifests.contains(&id));
        }
        roots.keys.contains(key)
    };
    for prefix in [layout::MANIFESTS, layout::WORKING_SETS, layout::VM_STATES] {
        for key in store.list(prefix).await? {
            if !live_keys(&key) {
                dead_objects.push((key, 0));
            }
        }
    }
    let rules = Rules {
        mark_ms,
        grace_ms: opts.grace.as_millis() as u64,
        rewrite_below: opts.rewrite_below,
    };
    progress("homes");
    let homes = mark
        .homes(
            |id| state.is_condemned(&layout::pack_key(id)),
            rules.rewrite_below,
        )
        .map_err(spill_err)?;
    drop(spill_dir);
    report.live_chunks = homes.live_chunks;
    let mut plan = plan::plan(
        Marked {
            packs: homes.packs,
            missing_chunks: homes.missing_chunks,
            dead_objects,
        },
        &state,
        &rules,
    );
    // Sizes of newly dead objects other than packs (reported, and kept
    // with the condemnation for the run that deletes them).
    for (key, bytes) in plan.condemn.iter_mut().filter(|(_, b)| *b == 0) {
        *bytes = store.head(key).await?.unwrap_or(0);
    }
    report.missing_chunks = plan.missing_chunks;
    report.pack_bytes = plan.pack_bytes;
    report.live_bytes = plan.live_bytes;
    report.waiting = plan.waiting;
    report.waiting_bytes = plan.waiting_bytes;
    report.uncondemned = plan.uncondemn.len() as u64;
    if opts.dry_run {
        report.condemned = plan.condemn.len() as u64 + plan.rewrite.len() as u64;
        report.condemned_bytes = plan.condemn.iter().map(|c| c.1).sum::<u64>()
            + plan.rewrite.iter().map(|r| r.bytes).sum::<u64>();
        report.deleted = plan.delete.len() as u64;
        report.deleted_packs = plan
            .delete
            .iter()
            .filter(|(k, _)| layout::pack_of_key(k).is_some())
            .count() as u64;
        report.reclaimed_bytes = plan.delete.iter().map(|(_, c)| c.bytes).sum();
        report.packs_rewritten = plan.rewrite.len() as u64;
        report.bytes_copied = plan
            .rewrite
            .iter()
            .flat_map(|r| &r.keep)
            .map(|e| u64::from(e.frame_len))
            .sum();
        return Ok(report);
    }

    if !plan.rewrite.is_empty() {
        progress("rewriting sparse packs");
        let rewrite = std::mem::take(&mut plan.rewrite);
        report.bytes_copied = rewrite_packs(store, &opts.staging_dir, &rewrite).await?;
        report.packs_rewritten = rewrite.len() as u64;
        plan.condemn
            .extend(rewrite.iter().map(|r| (layout::pack_key(&r.pack), r.bytes)));
    }
    report.condemned = plan.condemn.len() as u64;
    report.condemned_bytes = plan.condemn.iter().map(|c| c.1).sum();

    // Commit the decisions; only what is still condemned now (a writer
    // may have taken something back) moves to `deleting`.
    let mut deleting: Vec<(String, Condemned)> = Vec::new();
    state::update::<GcError>(store, |s| {
        check_lease(s.lease.as_ref(), opts)?;
        deleting.clear();
        let now = now_ms();
        for key in &plan.uncondemn {
            s.condemned.remove(key);
            s.deleting.remove(key);
        }
        for (key, bytes) in &plan.condemn {
            if !s.deleting.contains_key(key) {
                s.condemned.entry(key.clone()).or_insert(Condemned {
                    at_ms: now,
                    bytes: *bytes,
                });
            }
        }
        for (key, _) in &plan.delete {
            if let Some(c) = s
                .condemned
                .remove(key)
                .or_else(|| s.deleting.get(key).copied())
            {
                s.deleting.insert(key.clone(), c);
                deleting.push((key.clone(), c));
            }
        }
        Ok(true)
    })
    .await?;

    progress("deleting");
    let lease_end = now_ms() + opts.lease.as_millis() as u64;
    let mut deleted: Vec<String> = Vec::new();
    for (key, c) in &deleting {
        if now_ms() + LEASE_MARGIN.as_millis() as u64 > lease_end {
            tracing::warn!("the lease is running out: the rest is deleted by the next run");
            break;
        }
        delete_object(store, &opts.index_dir, key).await?;
        report.deleted += 1;
        report.reclaimed_bytes += c.bytes;
        if layout::pack_of_key(key).is_some() {
            report.deleted_packs += 1;
        }
        deleted.push(key.clone());
    }
    let (reclaimed, rewritten) = (report.reclaimed_bytes, report.packs_rewritten);
    state::update::<GcError>(store, |s| {
        for key in &deleted {
            s.deleting.remove(key);
        }
        s.runs += 1;
        s.reclaimed_bytes += reclaimed;
        s.packs_rewritten += rewritten;
        Ok(true)
    })
    .await?;
    Ok(report)
}

fn check_lease(lease: Option<&Lease>, opts: &GcOptions) -> Result<(), GcError> {
    match lease {
        Some(l) if l.by == opts.by && l.until_ms > now_ms() => Ok(()),
        _ => Err(GcError::LostLease),
    }
}

/// Deletes an object; a pack goes index first, so no reader learns of it
/// again, then its data, then this host's copy of its index.
async fn delete_object(
    store: &dyn ObjectStore,
    index_dir: &Path,
    key: &str,
) -> Result<(), GcError> {
    if let Some(pack) = layout::pack_of_key(key) {
        store.delete(&layout::pack_index_key(&pack)).await?;
        store.delete(key).await?;
        let _ = tokio::fs::remove_file(locate::local_copy(index_dir, &pack)).await;
    } else {
        store.delete(key).await?;
    }
    Ok(())
}

/// Copies the live frames of sparse packs into new packs (each frame
/// checked against its chunk id on the way) and uploads them. Returns the
/// frame bytes copied.
async fn rewrite_packs(
    store: &dyn ObjectStore,
    staging: &Path,
    rewrite: &[Rewrite],
) -> Result<u64, GcError> {
    tokio::fs::create_dir_all(staging)
        .await
        .map_err(|source| GcError::Staging {
            path: staging.to_owned(),
            source,
        })?;
    let mut out = PackSink {
        staging,
        writer: None,
    };
    let mut copied = 0;
    for r in rewrite {
        for run in PackIndex::runs(r.keep.clone(), MERGE_GAP) {
            let (first, last) = (run[0], run[run.len() - 1]);
            let key = layout::pack_key(&r.pack);
            let bytes = store.get(&key, Some(first.offset..last.end())).await?;
            for (e, f) in pack::frames_of_run(&run, &bytes) {
                let f = f.ok_or_else(|| GcError::BadFrame {
                    pack: r.pack,
                    detail: "the pack is shorter than its index says".to_owned(),
                })?;
                frame::decode_chunk(f, e.id, Verify::Digest).map_err(|e| GcError::BadFrame {
                    pack: r.pack,
                    detail: e.to_string(),
                })?;
                out.append(store, f).await?;
                copied += u64::from(e.frame_len);
            }
        }
    }
    out.seal(store).await?;
    Ok(copied)
}

/// New packs being filled by a rewrite.
struct PackSink<'a> {
    staging: &'a Path,
    writer: Option<PackWriter>,
}

impl PackSink<'_> {
    async fn append(&mut self, store: &dyn ObjectStore, frame: &[u8]) -> Result<(), GcError> {
        if self.writer.is_none() {
            let path = self
                .staging
                .join(format!("gc-{:016x}.partial", fastrand::u64(..)));
            self.writer = Some(PackWriter::create(&path)?);
        }
        let w = self.writer.as_mut().expect("created above");
        w.append(frame)?;
        if w.len() >= REWRITE_PACK_TARGET {
            self.seal(store).await?;
        }
        Ok(())
    }

    /// Uploads the pack being filled: data, then index, as imports do.
    async fn seal(&mut self, store: &dyn ObjectStore) -> Result<(), GcError> {
        let Some(w) = self.writer.take() else {
            return Ok(());
        };
        let path = w.path().to_owned();
        let index = w.finish()?;
        super::guard::put_pack(store, &index, &path).await?;
        let _ = tokio::fs::remove_file(&path).await;
        Ok(())
    }
}
