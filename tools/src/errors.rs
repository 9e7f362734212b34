//! Errors as `--json` reports them: one object on stdout with `error` (the
//! message), `kind` (what sort of failure, stable for scripts) and
//! `detail` (the message with its causes).

use cairn_engine::catalog::CatalogError;
use cairn_engine::chunkstore::ChunkStoreError;
use cairn_engine::gc::GcError;
use cairn_engine::objstore::StoreError;
use cairn_engine::oci::OciError;
use cairn_engine::overlay::OverlayError;
use cairn_engine::ErrorKind;

/// The kind of the first error in the chain that has one, in snake case;
/// `error` when none does.
pub fn kind_of(e: &anyhow::Error) -> &'static str {
    e.chain()
        .find_map(|cause| {
            let kind = if let Some(x) = cause.downcast_ref::<StoreError>() {
                x.kind()
            } else if let Some(x) = cause.downcast_ref::<CatalogError>() {
                x.kind()
            } else if let Some(x) = cause.downcast_ref::<ChunkStoreError>() {
                x.kind()
            } else if let Some(x) = cause.downcast_ref::<GcError>() {
                x.kind()
            } else if let Some(x) = cause.downcast_ref::<OciError>() {
                x.kind()
            } else if let Some(x) = cause.downcast_ref::<OverlayError>() {
                x.kind()
            } else if let Some(x) = cause.downcast_ref::<std::io::Error>() {
                return Some(if x.kind() == std::io::ErrorKind::NotFound {
                    "not_found"
                } else {
                    "io"
                });
            } else {
                return None;
            };
            Some(name(kind))
        })
        .unwrap_or("error")
}

fn name(kind: ErrorKind) -> &'static str {
    match kind {
        ErrorKind::NotFound => "not_found",
        ErrorKind::Corrupt => "corrupt",
        ErrorKind::Transient => "transient",
        ErrorKind::Io => "io",
        ErrorKind::InvalidInput => "invalid_input",
        ErrorKind::Unsupported => "unsupported",
        ErrorKind::PermissionDenied => "permission_denied",
        ErrorKind::Conflict => "conflict",
    }
}

/// Prints the error object on stdout.
pub fn print_json(kind: &str, error: &str, detail: &str) {
    let value = serde_json::json!({
        "error": error.trim_end(),
        "kind": kind,
        "detail": detail.trim_end(),
    });
    println!("{value}");
}
