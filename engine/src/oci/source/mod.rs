//! Where images come from: an OCI image layout, a docker archive, a
//! registry. Each resolves a reference to one image (manifest lists and
//! indexes resolved to the platform) and opens its layer blobs; every
//! manifest and config read is checked against its digest and capped in
//! size, and layer blobs are checked as they are applied.

mod archive;
mod layout;
#[cfg(feature = "registry")]
pub mod registry;

use std::io::Read;

use oci_spec::image::{Descriptor, ImageIndex, ImageManifest};

use super::digest::Digest;
use super::error::OciError;
use super::reference::ImageRef;
use super::OciOptions;

/// Largest manifest or index cairn reads.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// Manifests followed from an index to an image manifest.
const MAX_INDEX_DEPTH: usize = 4;

/// `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    /// This machine's.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            "x86" => "386",
            a => a,
        };
        Platform {
            os: "linux".into(),
            arch: arch.into(),
            variant: None,
        }
    }

    pub fn parse(s: &str) -> Result<Platform, OciError> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch] if !os.is_empty() && !arch.is_empty() => Ok(Platform {
                os: (*os).into(),
                arch: (*arch).into(),
                variant: None,
            }),
            [os, arch, v] if !os.is_empty() && !arch.is_empty() && !v.is_empty() => Ok(Platform {
                os: (*os).into(),
                arch: (*arch).into(),
                variant: Some((*v).into()),
            }),
            _ => Err(OciError::Invalid(format!(
                "platform `{s}` is not OS/ARCH[/VARIANT], e.g. linux/amd64"
            ))),
        }
    }

    fn matches(&self, d: &Descriptor) -> bool {
        d.platform().as_ref().is_some_and(|p| {
            p.os().to_string() == self.os
                && p.architecture().to_string() == self.arch
                && self
                    .variant
                    .as_ref()
                    .is_none_or(|v| p.variant().as_deref() == Some(v.as_str()))
        })
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// A layer blob to open.
#[derive(Debug, Clone)]
pub struct LayerDesc {
    /// Its digest and size from the manifest (none in a docker archive).
    pub digest: Option<Digest>,
    pub size: Option<u64>,
    pub media_type: String,
    /// How messages and records name it.
    pub name: String,
}

/// One image, resolved.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub manifest_digest: Option<Digest>,
    pub config: Vec<u8>,
    pub config_digest: Digest,
    pub layers: Vec<LayerDesc>,
    /// The name the source suggests (a docker archive's repository).
    pub suggested_name: Option<String>,
}

/// An opened image source.
pub trait Source {
    fn resolve(&mut self, platform: &Platform) -> Result<Resolved, OciError>;
    fn open(&mut self, layer: &LayerDesc) -> Result<Box<dyn Read + Send>, OciError>;
}

pub fn open(r: &ImageRef, opts: &OciOptions) -> Result<Box<dyn Source + 'static>, OciError> {
    match r {
        ImageRef::Layout { dir, tag } => Ok(Box::new(layout::Layout::open(dir, tag.clone())?)),
        ImageRef::Archive { file, select } => {
            Ok(Box::new(archive::Archive::open(file, select.clone())?))
        }
        #[cfg(feature = "registry")]
        ImageRef::Registry(reference) => Ok(Box::new(registry::Registry::open(reference, opts)?)),
        #[cfg(not(feature = "registry"))]
        ImageRef::Registry(_) => {
            let _ = opts;
            Err(OciError::Unsupported(
                "this build of cairn has no registry support (feature `registry`)".into(),
            ))
        }
    }
}

/// Checks `bytes` against a descriptor's digest and size.
pub fn check_blob(what: &str, bytes: &[u8], digest: &Digest, size: u64) -> Result<(), OciError> {
    if bytes.len() as u64 != size {
        return Err(OciError::Layer {
            layer: format!("{what} {digest}"),
            reason: format!("{} bytes where its descriptor says {size}", bytes.len()),
        });
    }
    let got = Digest::of(bytes);
    if got != *digest {
        return Err(OciError::Digest {
            what: what.to_owned(),
            expected: digest.to_string(),
            actual: got.to_string(),
        });
    }
    Ok(())
}

pub fn digest_of(d: &Descriptor) -> Result<Digest, OciError> {
    d.digest().to_string().parse()
}

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// Follows a manifest (or index) to the image manifest for `platform`.
/// `fetch` returns a manifest's bytes, checked against the descriptor.
pub fn resolve_manifest(
    first: (Vec<u8>, Option<Digest>),
    platform: &Platform,
    mut fetch: impl FnMut(&Descriptor) -> Result<Vec<u8>, OciError>,
) -> Result<(ImageManifest, Option<Digest>), OciError> {
    let (mut bytes, mut digest) = first;
    for _ in 0..MAX_INDEX_DEPTH {
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| OciError::Invalid(format!("a manifest is not JSON: {e}")))?;
        let mt = v.get("mediaType").and_then(|m| m.as_str()).unwrap_or("");
        let is_index = INDEX_TYPES.contains(&mt) || (mt.is_empty() && v.get("manifests").is_some());
        if !is_index {
            if !mt.is_empty() && !MANIFEST_TYPES.contains(&mt) {
                return Err(OciError::Unsupported(format!(
                    "manifest media type `{mt}` is not an image manifest cairn reads (OCI or Docker v2 schema 2)"
                )));
            }
            let m: ImageManifest = serde_json::from_slice(&bytes).map_err(|e| {
                OciError::Invalid(format!("the image manifest does not parse: {e}"))
            })?;
            return Ok((m, digest));
        }
        let index: ImageIndex = serde_json::from_slice(&bytes)
            .map_err(|e| OciError::Invalid(format!("the image index does not parse: {e}")))?;
        let pick = index
            .manifests()
            .iter()
            .find(|d| platform.matches(d))
            .ok_or_else(|| {
                let have: Vec<String> = index
                    .manifests()
                    .iter()
                    .filter_map(|d| d.platform().as_ref())
                    .map(|p| {
                        let mut s = format!("{}/{}", p.os(), p.architecture());
                        if let Some(v) = p.variant() {
                            s += &format!("/{v}");
                        }
                        s
                    })
                    .collect();
                OciError::NotFound(format!(
                    "the image has no manifest for platform {platform} (it has: {}); pass --platform",
                    if have.is_empty() { "none named".into() } else { have.join(", ") }
                ))
            })?
            .clone();
        digest = Some(digest_of(&pick)?);
        bytes = fetch(&pick)?;
    }
    Err(OciError::Invalid(format!(
        "image indexes nested more than {MAX_INDEX_DEPTH} deep"
    )))
}

/// The layers of an image manifest as descriptors to open.
pub fn layers_of(m: &ImageManifest) -> Result<Vec<LayerDesc>, OciError> {
    m.layers()
        .iter()
        .map(|d| {
            let digest = digest_of(d)?;
            Ok(LayerDesc {
                name: digest.to_string(),
                digest: Some(digest),
                size: Some(d.size()),
                media_type: d.media_type().to_string(),
            })
        })
        .collect()
}
