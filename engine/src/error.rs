//! The stable classification every engine error maps to.
//!
//! Callers decide on the kind (retry, answer the guest with an I/O error,
//! fail the restore), never on message text.

/// What sort of failure an error is, independent of where it happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The named thing does not exist.
    NotFound,
    /// Bytes failed a checksum or digest, or do not parse: never retried as-is.
    Corrupt,
    /// Worth retrying: a timeout, a dropped connection, a 5xx, throttling.
    Transient,
    /// Local I/O failed.
    Io,
    /// The caller asked for something malformed.
    InvalidInput,
    /// A format version or feature this build does not know.
    Unsupported,
    /// Credentials were rejected or lack permission.
    PermissionDenied,
    /// The request conflicts with what is there now (a name is taken, a
    /// state cannot move that way, another host owns the record): not
    /// retried as-is.
    Conflict,
}

impl ErrorKind {
    pub fn is_transient(self) -> bool {
        self == ErrorKind::Transient
    }
}

/// An error with its causes, on one line: `what: why: deeper why`.
pub struct DisplayChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cur = self.0.source();
        while let Some(e) = cur {
            write!(f, ": {e}")?;
            cur = e.source();
        }
        Ok(())
    }
}
