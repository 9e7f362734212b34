//! An OCI image layout directory: `oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`. Blob paths come only from validated digests.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use oci_spec::image::{Descriptor, ImageIndex};

use super::{
    check_blob, digest_of, layers_of, resolve_manifest, LayerDesc, Platform, Resolved, Source,
    MAX_MANIFEST_BYTES,
};
use crate::oci::digest::Digest;
use crate::oci::error::OciError;
use crate::oci::image::MAX_CONFIG_BYTES;

const REF_NAME: &str = "org.opencontainers.image.ref.name";

pub struct Layout {
    dir: PathBuf,
    tag: Option<String>,
}

/// Reads a whole file of at most `max` bytes.
pub(super) fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, OciError> {
    let f = File::open(path).map_err(|e| OciError::io("cannot open", path, e))?;
    let mut v = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut v)
        .map_err(|e| OciError::io("cannot read", path, e))?;
    if v.len() as u64 > max {
        return Err(OciError::Limit {
            what: path.display().to_string(),
            limit: max,
            detail: "a manifest or config that large is not legitimate".into(),
        });
    }
    Ok(v)
}

impl Layout {
    pub fn open(dir: &Path, tag: Option<String>) -> Result<Layout, OciError> {
        let marker = read_capped(&dir.join("oci-layout"), 4096)?;
        let v: serde_json::Value = serde_json::from_slice(&marker).map_err(|e| {
            OciError::Invalid(format!("{}/oci-layout is not JSON: {e}", dir.display()))
        })?;
        if v.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
            return Err(OciError::Unsupported(format!(
                "{}: image layout version {} (cairn reads 1.0.0)",
                dir.display(),
                v.get("imageLayoutVersion")
                    .unwrap_or(&serde_json::Value::Null)
            )));
        }
        Ok(Layout {
            dir: dir.to_owned(),
            tag,
        })
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        self.dir.join("blobs").join("sha256").join(d.hex())
    }

    fn read_blob(&self, what: &str, d: &Descriptor, max: u64) -> Result<Vec<u8>, OciError> {
        let digest = digest_of(d)?;
        if d.size() > max {
            return Err(OciError::Limit {
                what: format!("{what} {digest}"),
                limit: max,
                detail: format!("its descriptor says {} bytes", d.size()),
            });
        }
        let bytes = read_capped(&self.blob_path(&digest), max)?;
        check_blob(what, &bytes, &digest, d.size())?;
        Ok(bytes)
    }

    fn pick(&self, index: &ImageIndex) -> Result<Descriptor, OciError> {
        let ms = index.manifests();
        let named = |d: &&Descriptor| {
            d.annotations()
                .as_ref()
                .and_then(|a| a.get(REF_NAME))
                .cloned()
        };
        match &self.tag {
            Some(tag) => ms
                .iter()
                .find(|d| named(d).is_some_and(|n| n == *tag || n.ends_with(&format!(":{tag}"))))
                .cloned()
                .ok_or_else(|| {
                    let tags: Vec<String> = ms.iter().filter_map(|d| named(&d)).collect();
                    OciError::NotFound(format!(
                        "{} has no image tagged `{tag}` (tags: {})",
                        self.dir.display(),
                        if tags.is_empty() {
                            "none".into()
                        } else {
                            tags.join(", ")
                        }
                    ))
                }),
            None if ms.len() == 1 => Ok(ms[0].clone()),
            None => Err(OciError::Invalid(format!(
                "{} holds {} images: name one as oci:DIR:TAG",
                self.dir.display(),
                ms.len()
            ))),
        }
    }
}

impl Source for Layout {
    fn resolve(&mut self, platform: &Platform) -> Result<Resolved, OciError> {
        let index_bytes = read_capped(&self.dir.join("index.json"), MAX_MANIFEST_BYTES)?;
        let index: ImageIndex = serde_json::from_slice(&index_bytes).map_err(|e| {
            OciError::Invalid(format!(
                "{}/index.json does not parse: {e}",
                self.dir.display()
            ))
        })?;
        let top = self.pick(&index)?;
        let first = self.read_blob("manifest", &top, MAX_MANIFEST_BYTES)?;
        let (manifest, manifest_digest) =
            resolve_manifest((first, Some(digest_of(&top)?)), platform, |d| {
                self.read_blob("manifest", d, MAX_MANIFEST_BYTES)
            })?;
        let config = self.read_blob("config", manifest.config(), MAX_CONFIG_BYTES)?;
        Ok(Resolved {
            manifest_digest,
            config_digest: digest_of(manifest.config())?,
            config,
            layers: layers_of(&manifest)?,
            suggested_name: None,
        })
    }

    fn open(&mut self, layer: &LayerDesc) -> Result<Box<dyn Read + Send>, OciError> {
        let digest = layer
            .digest
            .as_ref()
            .expect("layout layers always have digests");
        let path = self.blob_path(digest);
        let f = File::open(&path).map_err(|e| OciError::io("cannot open layer blob", &path, e))?;
        Ok(Box::new(f))
    }
}
