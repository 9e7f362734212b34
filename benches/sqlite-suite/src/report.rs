//! The run's result: one JSON line for harnesses, or a table for people.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{Config, Mode};

/// Prefix of the JSON line, so a guest-console harness can find it among
/// kernel and init messages.
pub const JSON_PREFIX: &str = "CAIRN-SQLITE ";

/// One timed operation.
#[derive(Clone, Debug, Serialize)]
pub struct Operation {
    /// Stable snake_case name (the Python script's result key for the ported
    /// operations).
    pub name: &'static str,
    pub seconds: f64,
    /// The operation's size: rows written, changed or counted, or queries
    /// run, as documented at each operation.
    pub rows: u64,
    /// Whether the timed part is dominated by commits and their fsyncs
    /// rather than by CPU or reads.
    pub fsync_heavy: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub mode: Mode,
    pub scale: f64,
    pub cold: bool,
    pub operations: Vec<Operation>,
    /// The sum of the operations' seconds, as the Python script's
    /// `total_time` (which sums them after rounding each to 4 decimals).
    pub total_seconds: f64,
    pub sqlite_version: &'static str,
    /// Size of the database file and its WAL at the end of the run.
    pub db_bytes: u64,
}

impl Report {
    pub(crate) fn new(
        config: &Config,
        operations: Vec<Operation>,
        sqlite_version: &'static str,
        db_bytes: u64,
    ) -> Self {
        let total_seconds = operations.iter().map(|op| op.seconds).sum();
        Self {
            mode: config.mode,
            scale: config.scale,
            cold: config.cold,
            operations,
            total_seconds,
            sqlite_version,
            db_bytes,
        }
    }

    /// `CAIRN-SQLITE {...}` on one line, without a newline.
    pub fn json_line(&self) -> serde_json::Result<String> {
        Ok(format!("{JSON_PREFIX}{}", serde_json::to_string(self)?))
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "sqlite-suite mode={} scale={} cold={} sqlite={} db={:.2} MiB",
            self.mode.name(),
            self.scale,
            self.cold,
            self.sqlite_version,
            self.db_bytes as f64 / 1_048_576.0
        );
        let _ = writeln!(
            out,
            "{:<22} {:>10} {:>10} {:>12}  fsync-heavy",
            "operation", "seconds", "rows", "rows/s"
        );
        for op in &self.operations {
            let rate = if op.seconds > 0.0 {
                format!("{:.0}", op.rows as f64 / op.seconds)
            } else {
                "-".to_owned()
            };
            let _ = writeln!(
                out,
                "{:<22} {:>10.4} {:>10} {:>12}  {}",
                op.name,
                op.seconds,
                op.rows,
                rate,
                if op.fsync_heavy { "yes" } else { "no" }
            );
        }
        let _ = writeln!(out, "{:<22} {:>10.4}", "total", self.total_seconds);
        out
    }
}
