//! Image names: unique within a project; public ones resolve from every
//! project (a project's own name first) and are unique in the store.
//!
//! An image record is immutable once created (removing it leaves a
//! tombstone). A public image's name is also claimed at
//! `catalog/public-images/<name>` with a copy of its record, so resolving
//! it from another project is two GETs. Names written before the catalog
//! (`refs/images/<name>`) are read as project `default`'s, never written;
//! `image rm` deletes them.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use super::record::{self, as_text, Created, Kind};
use super::{check_name, check_project, load_manifest, CatalogError, DEFAULT_PROJECT};
use crate::error::ErrorKind;
use crate::id::ManifestId;
use crate::layout;
use crate::manifest::{Manifest, ManifestKind};
use crate::objstore::ObjectStore;

/// How an image was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Made {
    /// `import-raw`, `disk-snapshot`, `mem-import`, `register`, `legacy-ref`, ...
    pub how: String,
    /// What from: a file, an overlay, a snapshot URI, a reference.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// The Dockerfile given when it was registered, as text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
}

impl Made {
    pub fn new(how: &str, from: Option<String>) -> Made {
        Made {
            how: how.to_owned(),
            from,
            dockerfile: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    pub name: String,
    pub project: String,
    /// The image's manifest.
    #[serde(with = "as_text")]
    pub id: ManifestId,
    pub public: bool,
    /// `disk` or `memory`.
    pub kind: String,
    /// Logical size in bytes.
    pub size: u64,
    /// Logical bytes of the chunks this image does not share with its
    /// parent (each distinct non-zero chunk once; all of them without a parent).
    pub unique_bytes: u64,
    #[serde(with = "as_text::option")]
    pub parent: Option<ManifestId>,
    pub made: Made,
    /// RFC 3339; empty for names from before the catalog.
    pub created: String,
}

impl Kind for ImageRecord {
    const KIND: &'static str = "image";
}

/// What [`create`] needs.
#[derive(Debug, Clone)]
pub struct NewImage {
    pub project: String,
    pub name: String,
    pub id: ManifestId,
    pub public: bool,
    pub parent: Option<ManifestId>,
    pub made: Made,
}

/// Logical bytes of `m`'s distinct non-zero chunks that `parent` lacks.
pub fn unique_bytes(m: &Manifest, parent: Option<&Manifest>) -> u64 {
    let mut seen: HashSet<_> = parent
        .map(|p| p.chunks.iter().flatten().copied().collect())
        .unwrap_or_default();
    m.chunks
        .iter()
        .enumerate()
        .filter_map(|(i, c)| c.filter(|c| seen.insert(*c)).map(|_| m.chunk_len(i)))
        .map(u64::from)
        .sum()
}

fn kind_name(m: &Manifest) -> &'static str {
    match m.kind {
        ManifestKind::Disk => "disk",
        ManifestKind::Memory => "memory",
    }
}

/// Names `new.id` `new.name` in `new.project` (and publicly, if asked).
/// Naming the same manifest the same way again succeeds and changes
/// nothing; a name held by another image is refused.
pub async fn create(store: &dyn ObjectStore, new: NewImage) -> Result<ImageRecord, CatalogError> {
    let rec = record_for(store, new).await?;
    let taken = |holder: String| CatalogError::NameTaken {
        what: "image",
        name: rec.name.clone(),
        project: rec.project.clone(),
        holder,
    };
    if rec.project == DEFAULT_PROJECT {
        if let Some(old) = legacy_ref(store, &rec.name).await? {
            if old != rec.id {
                return Err(taken(format!(
                    "image {} named before the catalog, at {}",
                    old.short(),
                    layout::image_ref_key(&rec.name)
                )));
            }
        }
    }
    let key = layout::image_key(&rec.project, &rec.name);
    let rec = match record::create(store, &key, &rec).await? {
        Created::Won(_) => rec,
        Created::Taken(held) if held.record.id == rec.id && held.record.public == rec.public => {
            held.record
        }
        Created::Taken(held) => return Err(taken(format!("image {}", held.record.id.short()))),
    };
    if rec.public {
        claim_public(store, &key, &rec).await?;
    }
    Ok(rec)
}

/// The record `new` makes, checked against its manifests.
async fn record_for(store: &dyn ObjectStore, new: NewImage) -> Result<ImageRecord, CatalogError> {
    check_project(&new.project)?;
    check_name(&new.name)?;
    let manifest = load_manifest(store, &new.id).await?;
    let parent = match &new.parent {
        Some(p) => Some(load_manifest(store, p).await?),
        None => None,
    };
    Ok(ImageRecord {
        name: new.name,
        project: new.project,
        id: new.id,
        public: new.public,
        kind: kind_name(&manifest).to_owned(),
        size: manifest.logical_size,
        unique_bytes: unique_bytes(&manifest, parent.as_ref()),
        parent: new.parent,
        made: new.made,
        created: record::now(),
    })
}

/// Like [`create`], but a private name that names another private image
/// is moved to this one (a rebuild or a re-import of a moved tag): one
/// compare-and-swap, so racing movers each land whole, one after the
/// other. A public name, or one from before the catalog, is not moved.
pub async fn create_or_move(
    store: &dyn ObjectStore,
    new: NewImage,
) -> Result<ImageRecord, CatalogError> {
    let refused = match create(store, new.clone()).await {
        Err(e @ CatalogError::NameTaken { .. }) if !new.public => e,
        other => return other,
    };
    let rec = record_for(store, new).await?;
    let key = layout::image_key(&rec.project, &rec.name);
    let moved = record::update::<ImageRecord>(store, &key, |held| {
        if held.public {
            Err(CatalogError::NameTaken {
                what: "image",
                name: held.name.clone(),
                project: held.project.clone(),
                holder: format!("public image {}, which is not moved", held.id.short()),
            })
        } else {
            Ok(rec.clone())
        }
    })
    .await?;
    moved.map(|s| s.record).ok_or(refused)
}

/// Takes the store-wide public name; gives the project's name back if
/// another project holds it.
async fn claim_public(
    store: &dyn ObjectStore,
    key: &str,
    rec: &ImageRecord,
) -> Result<(), CatalogError> {
    let public_key = layout::public_image_key(&rec.name);
    match record::create(store, &public_key, rec).await? {
        Created::Won(_) => Ok(()),
        Created::Taken(held) if held.record.project == rec.project && held.record.id == rec.id => {
            Ok(())
        }
        Created::Taken(held) => {
            record::remove::<ImageRecord>(store, key, "public name refused", |_| Ok(())).await?;
            Err(CatalogError::PublicNameTaken {
                name: rec.name.clone(),
                owner: held.record.project,
            })
        }
    }
}

/// The manifest a pre-catalog name points at, if there is one.
async fn legacy_ref(
    store: &dyn ObjectStore,
    name: &str,
) -> Result<Option<ManifestId>, CatalogError> {
    let key = layout::image_ref_key(name);
    let body = match store.get(&key, None).await {
        Ok(b) => b,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let text = String::from_utf8_lossy(&body);
    text.trim()
        .parse()
        .map(Some)
        .map_err(|_| CatalogError::BadRecord {
            key,
            detail: format!(
                "not a manifest id: {:?}",
                text.chars().take(80).collect::<String>()
            ),
        })
}

/// A pre-catalog name as a record (its manifest read for the sizes).
async fn legacy_record(
    store: &dyn ObjectStore,
    name: &str,
    id: ManifestId,
) -> Result<ImageRecord, CatalogError> {
    let m = load_manifest(store, &id).await?;
    Ok(ImageRecord {
        name: name.to_owned(),
        project: DEFAULT_PROJECT.to_owned(),
        id,
        public: false,
        kind: kind_name(&m).to_owned(),
        size: m.logical_size,
        unique_bytes: unique_bytes(&m, None),
        parent: None,
        made: Made::new("legacy-ref", Some(layout::image_ref_key(name))),
        created: String::new(),
    })
}

/// The image `name` names in `project`: its own first, then a public
/// one, then (in `default`) a name from before the catalog. One GET when
/// the project has the name.
pub async fn get(
    store: &dyn ObjectStore,
    project: &str,
    name: &str,
) -> Result<Option<ImageRecord>, CatalogError> {
    check_project(project)?;
    check_name(name)?;
    let own = layout::image_key(project, name);
    if let Some(s) = record::read_live::<ImageRecord>(store, &own).await? {
        return Ok(Some(s.record));
    }
    let public = layout::public_image_key(name);
    if let Some(s) = record::read_live::<ImageRecord>(store, &public).await? {
        return Ok(Some(s.record));
    }
    if project == DEFAULT_PROJECT {
        if let Some(id) = legacy_ref(store, name).await? {
            return Ok(Some(legacy_record(store, name, id).await?));
        }
    }
    Ok(None)
}

/// An image by name or manifest id: the id, and the record when named.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub id: ManifestId,
    pub record: Option<ImageRecord>,
}

pub async fn resolve(
    store: &dyn ObjectStore,
    project: &str,
    name_or_id: &str,
) -> Result<Resolved, CatalogError> {
    if let Ok(id) = name_or_id.parse::<ManifestId>() {
        let key = layout::manifest_key(&id);
        // Nothing references a condemned manifest, and its chunks may be
        // deleted by a run whose mark already passed: it cannot be named.
        if crate::gc::guard::is_condemned(store, &key).await? {
            return Err(CatalogError::Condemned { id });
        }
        return match store.head(&key).await? {
            Some(_) => Ok(Resolved { id, record: None }),
            None => Err(CatalogError::NoSuchManifest {
                id,
                store: store.uri().to_owned(),
            }),
        };
    }
    match get(store, project, name_or_id).await? {
        Some(r) => Ok(Resolved {
            id: r.id,
            record: Some(r),
        }),
        None => Err(CatalogError::NoSuchImage {
            name: name_or_id.to_owned(),
            project: project.to_owned(),
            store: store.uri().to_owned(),
        }),
    }
}

/// A record `project` sees that names manifest `id` (the first by name),
/// for describing an image given by id: a listing, not a lookup.
pub async fn named(
    store: &dyn ObjectStore,
    project: &str,
    id: &ManifestId,
) -> Result<Option<ImageRecord>, CatalogError> {
    Ok(list(store, project)
        .await?
        .into_iter()
        .filter_map(|(_, r)| r.ok())
        .find(|r| r.id == *id))
}

/// One page of `project`'s own image names, in order: one LIST.
pub async fn list_page(
    store: &dyn ObjectStore,
    project: &str,
    start_after: Option<&str>,
    limit: usize,
) -> Result<(Vec<String>, Option<String>), CatalogError> {
    check_project(project)?;
    super::list_names(store, &layout::images_prefix(project), start_after, limit).await
}

/// Every image `project` sees, by name: its own, the public ones of other
/// projects, and (in `default`) names from before the catalog. A record
/// that cannot be read is listed with its error.
pub async fn list(
    store: &dyn ObjectStore,
    project: &str,
) -> Result<Vec<(String, Result<ImageRecord, CatalogError>)>, CatalogError> {
    check_project(project)?;
    let mut keys: Vec<(String, String)> = Vec::new();
    for prefix in [
        layout::images_prefix(project),
        layout::PUBLIC_IMAGES.to_owned(),
    ] {
        keys.extend(
            store
                .list(&prefix)
                .await?
                .into_iter()
                .filter_map(|k| Some((k.strip_prefix(&prefix)?.to_owned(), k))),
        );
    }
    let mut out: Vec<(String, Result<ImageRecord, CatalogError>)> = Vec::new();
    let mut named = HashSet::new();
    for (name, key) in keys {
        match record::read_live::<ImageRecord>(store, &key).await {
            Ok(None) => {}
            // A public name of this project is listed once, as its own.
            Ok(Some(s)) if s.record.project == project && !named.insert(name.clone()) => {}
            Ok(Some(s)) => out.push((name, Ok(s.record))),
            Err(e) => out.push((name, Err(e))),
        }
    }
    if project == DEFAULT_PROJECT {
        for key in store.list(layout::IMAGE_REFS).await? {
            let name = key[layout::IMAGE_REFS.len()..].to_owned();
            if out
                .iter()
                .any(|(n, r)| *n == name && r.as_ref().is_ok_and(|r| r.project == project))
            {
                continue;
            }
            let rec = match legacy_ref(store, &name).await {
                Ok(Some(id)) => legacy_record(store, &name, id).await,
                Ok(None) => continue,
                Err(e) => Err(e),
            };
            out.push((name, rec));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// Removes `name` from `project` (and its public claim): its data goes at
/// the next garbage collection. Returns what it named.
pub async fn remove(
    store: &dyn ObjectStore,
    project: &str,
    name: &str,
    by: &str,
) -> Result<ImageRecord, CatalogError> {
    check_project(project)?;
    check_name(name)?;
    let key = layout::image_key(project, name);
    if let Some(s) = record::read_live::<ImageRecord>(store, &key).await? {
        if s.record.public {
            // The claim first: a crash between leaves a private image, not
            // a public name that resolves to a removed one.
            let public = layout::public_image_key(name);
            let ours = |r: &ImageRecord| r.project == project && r.id == s.record.id;
            if let Some(claim) = record::read_live::<ImageRecord>(store, &public).await? {
                if ours(&claim.record) {
                    record::remove(store, &public, by, |r: &ImageRecord| {
                        if ours(r) {
                            Ok(())
                        } else {
                            Err(CatalogError::PublicNameTaken {
                                name: name.to_owned(),
                                owner: r.project.clone(),
                            })
                        }
                    })
                    .await?;
                }
            }
        }
        if let Some(r) = record::remove::<ImageRecord>(store, &key, by, |_| Ok(())).await? {
            return Ok(r);
        }
    }
    if project == DEFAULT_PROJECT {
        if let Some(id) = legacy_ref(store, name).await? {
            // A name whose manifest is unreadable can still be removed.
            let rec = legacy_record(store, name, id)
                .await
                .unwrap_or_else(|_| legacy_placeholder(name, id));
            store.delete(&layout::image_ref_key(name)).await?;
            return Ok(rec);
        }
    }
    Err(CatalogError::NoSuchImage {
        name: name.to_owned(),
        project: project.to_owned(),
        store: store.uri().to_owned(),
    })
}

fn legacy_placeholder(name: &str, id: ManifestId) -> ImageRecord {
    ImageRecord {
        name: name.to_owned(),
        project: DEFAULT_PROJECT.to_owned(),
        id,
        public: false,
        kind: String::new(),
        size: 0,
        unique_bytes: 0,
        parent: None,
        made: Made::new("legacy-ref", None),
        created: String::new(),
    }
}

/// Every image name in the store, in every project, with what it names
/// or why that cannot be read (`cairn verify`): keys, not pages.
pub async fn every_name(
    store: &dyn ObjectStore,
) -> Result<Vec<(String, Result<ManifestId, CatalogError>)>, CatalogError> {
    let mut out = Vec::new();
    for prefix in [
        format!("{}images/", layout::CATALOG),
        layout::PUBLIC_IMAGES.to_owned(),
    ] {
        for key in store.list(&prefix).await? {
            let id = match record::read_live::<ImageRecord>(store, &key).await {
                Ok(Some(s)) => Ok(s.record.id),
                Ok(None) => continue,
                Err(e) => Err(e),
            };
            out.push((key, id));
        }
    }
    for key in store.list(layout::IMAGE_REFS).await? {
        let name = &key[layout::IMAGE_REFS.len()..];
        let id = legacy_ref(store, name).await.and_then(|id| {
            id.ok_or_else(|| CatalogError::BadRecord {
                key: key.clone(),
                detail: "vanished while listed".to_owned(),
            })
        });
        out.push((key, id));
    }
    Ok(out)
}
