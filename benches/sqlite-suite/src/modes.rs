//! The modes: their PRAGMAs and their sizes at a given `--scale`.
//!
//! `default`, `fsync` and `large` are the Python benchmark's `MODES` table;
//! `storage` and `image` are ours (see `storage.rs` and `image.rs`).

use serde::Serialize;

/// Which workload to run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// WAL, synchronous=NORMAL, 64 MB cache, 10k + 50k rows.
    Default,
    /// Rollback journal (DELETE), synchronous=FULL, 5k + 20k rows.
    Fsync,
    /// WAL, synchronous=NORMAL, 8 MB cache, 50k + 200k rows.
    Large,
    /// Ours: per-statement commits and a speedtest1-style mix on a database
    /// of `--db-mib` MiB behind a 2 MiB SQLite cache.
    Storage,
    /// Ours: reads of a database that is part of the disk image (built by
    /// `--prepare`), behind a 2 MiB SQLite cache; always cold.
    Image,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Default => "default",
            Mode::Fsync => "fsync",
            Mode::Large => "large",
            Mode::Storage => "storage",
            Mode::Image => "image",
        }
    }

    pub(crate) fn pragmas(self) -> Pragmas {
        match self {
            Mode::Default => Pragmas {
                journal_mode: "WAL",
                synchronous: "NORMAL",
                cache_kib: 64_000,
            },
            Mode::Fsync => Pragmas {
                journal_mode: "DELETE",
                synchronous: "FULL",
                cache_kib: 64_000,
            },
            Mode::Large => Pragmas {
                journal_mode: "WAL",
                synchronous: "NORMAL",
                cache_kib: 8_000,
            },
            // A small cache, so that SQLite's cache does not hide the disk.
            Mode::Storage | Mode::Image => Pragmas {
                journal_mode: "DELETE",
                synchronous: "FULL",
                cache_kib: 2_048,
            },
        }
    }
}

/// The per-connection settings, run in this order right after opening.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Pragmas {
    pub journal_mode: &'static str,
    pub synchronous: &'static str,
    /// `PRAGMA cache_size=-N`: N KiB.
    pub cache_kib: u32,
}

/// `n` times `scale`, rounded, never below 1.
pub(crate) fn scaled(n: u64, scale: f64) -> u64 {
    ((n as f64 * scale).round() as u64).max(1)
}

/// Sizes of the ported operations (the Python `MODES` entries, plus the
/// constants its join and concurrent-read functions hard-code).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PortSizes {
    pub seq_inserts: u64,
    pub batch_inserts: u64,
    pub range_queries: u64,
    pub like_queries: u64,
    pub updates: u64,
    pub deletes: u64,
    pub tx_inserts: u64,
    /// Rows of `bench2` (10 000 in every Python mode).
    pub join_rows: u64,
    /// `bench2.bench_id` is drawn from `1..=join_max_id` (60 000 in every
    /// Python mode).
    pub join_max_id: i64,
    /// Reader threads (4; not scaled).
    pub reader_threads: u64,
    /// Range queries per reader thread (500).
    pub queries_per_thread: u64,
}

impl PortSizes {
    pub(crate) fn new(mode: Mode, scale: f64) -> Option<Self> {
        let [seq, batch, range, like, updates, deletes, tx] = match mode {
            Mode::Default => [10_000, 50_000, 1_000, 500, 5_000, 2_000, 5_000],
            Mode::Fsync => [5_000, 20_000, 500, 200, 2_000, 1_000, 5_000],
            Mode::Large => [50_000, 200_000, 2_000, 1_000, 10_000, 5_000, 10_000],
            Mode::Storage | Mode::Image => return None,
        };
        Some(Self {
            seq_inserts: scaled(seq, scale),
            batch_inserts: scaled(batch, scale),
            range_queries: scaled(range, scale),
            like_queries: scaled(like, scale),
            updates: scaled(updates, scale),
            deletes: scaled(deletes, scale),
            tx_inserts: scaled(tx, scale),
            join_rows: scaled(10_000, scale),
            join_max_id: scaled(60_000, scale) as i64,
            reader_threads: 4,
            queries_per_thread: scaled(500, scale),
        })
    }
}

/// Average file bytes per `t1` row in the storage mode, index included:
/// a payload of 100..=1024 bytes (mean 562), key, record and cell headers
/// (~20), the space left at the end of each 4 KiB page by cells that do not
/// fit (~45 a row), and the entry in the index on `k` (~28). Measured: a
/// 192 MiB run's file held 657 bytes a row after VACUUM.
pub(crate) const STORAGE_ROW_BYTES: f64 = 656.0;

/// Sizes of the storage mode.
#[derive(Clone, Copy, Debug)]
pub(crate) struct StorageSizes {
    /// Rows inserted one autocommit statement (one commit) each.
    pub commit_rows: u64,
    /// Rows of `t1`, enough for a file of about `--db-mib` MiB once the
    /// index is built.
    pub bulk_rows: u64,
    pub lookups: u64,
    /// A random 10% of the rows.
    pub update_rows: u64,
    /// A contiguous 10% of the ids, starting at `delete_first_id`.
    pub delete_rows: u64,
    pub delete_first_id: u64,
}

impl StorageSizes {
    pub(crate) fn new(db_mib: u64, scale: f64) -> Self {
        let bytes = db_mib as f64 * 1_048_576.0 * scale;
        Self::of_rows(((bytes / STORAGE_ROW_BYTES).round() as u64).max(1), scale)
    }

    /// The sizes for a table of `bulk_rows` rows.
    pub(crate) fn of_rows(bulk_rows: u64, scale: f64) -> Self {
        let tenth = (bulk_rows / 10).max(1);
        Self {
            commit_rows: scaled(3_000, scale),
            bulk_rows,
            lookups: scaled(10_000, scale),
            update_rows: tenth,
            delete_rows: tenth,
            delete_first_id: bulk_rows * 2 / 5 + 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_rounds_and_never_reaches_zero() {
        assert_eq!(scaled(10_000, 1.0), 10_000);
        assert_eq!(scaled(500, 0.01), 5);
        assert_eq!(scaled(200, 0.001), 1);
        let sizes = StorageSizes::new(192, 1.0);
        assert_eq!(sizes.bulk_rows, 306_900);
        assert!(sizes.delete_first_id + sizes.delete_rows <= sizes.bulk_rows);
    }
}
