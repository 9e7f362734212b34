//! The one error type of OCI import and build.

use std::io;
use std::path::PathBuf;

use crate::error::ErrorKind;
use crate::import::ImportError;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("`{reference}` is not an image reference: {reason}")]
    Reference { reference: String, reason: String },
    #[error("{what}: {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A layer entry that is malformed or would escape the image root.
    #[error("layer {layer}, entry `{entry}`: {reason}")]
    Entry {
        layer: String,
        entry: String,
        reason: String,
    },
    #[error("layer {layer}: {reason}")]
    Layer { layer: String, reason: String },
    #[error(
        "{what} {expected}: the bytes hash to {actual}; the source is damaged or was tampered with"
    )]
    Digest {
        what: String,
        expected: String,
        actual: String,
    },
    #[error("{what} is larger than the {limit}-byte limit ({detail})")]
    Limit {
        what: String,
        limit: u64,
        detail: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Unsupported(String),
    #[error("{0}")]
    NotFound(String),
    #[error("registry {registry}: {reason}")]
    Registry { registry: String, reason: String },
    #[error("registry {registry} refused the credentials ({reason}); cairn read {config}: log in (`docker login {registry}`) or fix the entry there")]
    Auth {
        registry: String,
        reason: String,
        config: String,
    },
    #[error("the disk: {0}")]
    Disk(String),
    #[error("the build: {0}")]
    Build(String),
    #[error(transparent)]
    Import(#[from] ImportError),
}

impl OciError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            OciError::Reference { .. } | OciError::Invalid(_) | OciError::Limit { .. } => {
                ErrorKind::InvalidInput
            }
            OciError::Entry { .. } | OciError::Layer { .. } | OciError::Digest { .. } => {
                ErrorKind::Corrupt
            }
            OciError::Io { .. } => ErrorKind::Io,
            OciError::Unsupported(_) => ErrorKind::Unsupported,
            OciError::NotFound(_) => ErrorKind::NotFound,
            OciError::Registry { .. } => ErrorKind::Transient,
            OciError::Auth { .. } => ErrorKind::PermissionDenied,
            OciError::Disk(_) | OciError::Build(_) => ErrorKind::InvalidInput,
            OciError::Import(e) => e.kind(),
        }
    }

    pub(crate) fn io(what: &'static str, path: impl Into<PathBuf>, source: io::Error) -> OciError {
        OciError::Io {
            what,
            path: path.into(),
            source,
        }
    }
}
