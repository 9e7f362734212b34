//! Names and manifests: images by name or id.
//!
//! A name is a small mutable object `refs/images/<name>` holding a
//! manifest id; manifests themselves are immutable and content-addressed.

use bytes::Bytes;

use crate::error::ErrorKind;
use crate::id::ManifestId;
use crate::layout;
use crate::manifest::{Manifest, ManifestError};
use crate::objstore::{ObjectStore, PutMode, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("no image named `{name}` in {store} (see `cairn image ls`)")]
    NoSuchImage { name: String, store: String },
    #[error("no manifest {id} in {store}")]
    NoSuchManifest { id: ManifestId, store: String },
    #[error("`{0}` is not a valid image name: use 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.', and not 64 hex digits (that is an id)")]
    BadName(String),
    #[error("name object for `{name}` is corrupt: {content:?}")]
    BadRef { name: String, content: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("manifest {id} is unreadable")]
    Manifest {
        id: ManifestId,
        #[source]
        source: ManifestError,
    },
}

impl CatalogError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            CatalogError::NoSuchImage { .. } | CatalogError::NoSuchManifest { .. } => {
                ErrorKind::NotFound
            }
            CatalogError::BadName(_) => ErrorKind::InvalidInput,
            CatalogError::BadRef { .. } => ErrorKind::Corrupt,
            CatalogError::Store(e) => e.kind(),
            CatalogError::Manifest { source, .. } => source.kind(),
        }
    }
}

pub fn check_name(name: &str) -> Result<(), CatalogError> {
    let ok = (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name.parse::<ManifestId>().is_err()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CatalogError::BadName(name.to_owned()))
    }
}

/// Points `name` at manifest `id`, replacing what it pointed at.
pub async fn set_image(
    store: &dyn ObjectStore,
    name: &str,
    id: &ManifestId,
) -> Result<(), CatalogError> {
    check_name(name)?;
    let body = Bytes::from(format!("{id}\n"));
    store
        .put(&layout::image_ref_key(name), body, PutMode::Overwrite)
        .await?;
    Ok(())
}

/// The manifest id a name or an id names.
pub async fn resolve(
    store: &dyn ObjectStore,
    name_or_id: &str,
) -> Result<ManifestId, CatalogError> {
    if let Ok(id) = name_or_id.parse::<ManifestId>() {
        return match store.head(&layout::manifest_key(&id)).await? {
            Some(_) => Ok(id),
            None => Err(CatalogError::NoSuchManifest {
                id,
                store: store.uri().to_owned(),
            }),
        };
    }
    check_name(name_or_id)?;
    let body = match store.get(&layout::image_ref_key(name_or_id), None).await {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(CatalogError::NoSuchImage {
                name: name_or_id.to_owned(),
                store: store.uri().to_owned(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    let text = String::from_utf8_lossy(&body);
    text.trim().parse().map_err(|_| CatalogError::BadRef {
        name: name_or_id.to_owned(),
        content: text.chars().take(80).collect(),
    })
}

/// Every named image, sorted by name.
pub async fn list_images(
    store: &dyn ObjectStore,
) -> Result<Vec<(String, Result<ManifestId, CatalogError>)>, CatalogError> {
    let mut out = Vec::new();
    for key in store.list(layout::IMAGE_REFS).await? {
        let name = key[layout::IMAGE_REFS.len()..].to_owned();
        let id = resolve(store, &name).await;
        out.push((name, id));
    }
    Ok(out)
}

/// Fetches and checks (digest, format) manifest `id`.
pub async fn load_manifest(
    store: &dyn ObjectStore,
    id: &ManifestId,
) -> Result<Manifest, CatalogError> {
    let bytes = match store.get(&layout::manifest_key(id), None).await {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(CatalogError::NoSuchManifest {
                id: *id,
                store: store.uri().to_owned(),
            })
        }
        Err(e) => return Err(e.into()),
    };
    Manifest::decode_verified(&bytes, *id)
        .map_err(|source| CatalogError::Manifest { id: *id, source })
}

#[cfg(test)]
mod tests {
    #[test]
    fn names() {
        for ok in ["debian", "a.b_c-1", "x"] {
            assert!(super::check_name(ok).is_ok(), "{ok}");
        }
        let hex = "a".repeat(64);
        for bad in ["", ".hidden", "a/b", "a b", hex.as_str()] {
            assert!(super::check_name(bad).is_err(), "{bad}");
        }
    }
}
