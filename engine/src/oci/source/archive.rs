//! A docker archive (`docker save` output): a tar holding `manifest.json`,
//! the config and the layer tars. Indexed once; members are then read in
//! place. Layer digests come from the config's `diff_ids`.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use super::{LayerDesc, Platform, Resolved, Source, MAX_MANIFEST_BYTES};
use crate::oci::digest::Digest;
use crate::oci::error::OciError;
use crate::oci::image::MAX_CONFIG_BYTES;

/// Members of an archive cairn indexes.
const MAX_MEMBERS: usize = 100_000;

pub struct Archive {
    file: PathBuf,
    select: Option<String>,
    /// Member path → (offset of its data, size).
    members: HashMap<String, (u64, u64)>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Entry {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

fn normalize(p: &str) -> String {
    p.trim_start_matches("./").to_owned()
}

impl Archive {
    pub fn open(file: &Path, select: Option<String>) -> Result<Archive, OciError> {
        let f = File::open(file).map_err(|e| OciError::io("cannot open", file, e))?;
        let mut ar = tar::Archive::new(f);
        let mut members = HashMap::new();
        let bad = |e: std::io::Error| {
            OciError::Invalid(format!(
                "{} is not a docker archive (tar): {e}",
                file.display()
            ))
        };
        for entry in ar.entries().map_err(bad)? {
            let entry = entry.map_err(bad)?;
            if members.len() >= MAX_MEMBERS {
                return Err(OciError::Limit {
                    what: format!("members of {}", file.display()),
                    limit: MAX_MEMBERS as u64,
                    detail: "not a docker archive".into(),
                });
            }
            if entry.header().entry_type().is_file() {
                let path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
                members.insert(normalize(&path), (entry.raw_file_position(), entry.size()));
            }
        }
        Ok(Archive {
            file: file.to_owned(),
            select,
            members,
        })
    }

    fn member(&self, name: &str) -> Result<(u64, u64), OciError> {
        self.members.get(&normalize(name)).copied().ok_or_else(|| {
            OciError::Invalid(format!(
                "{} has no member `{name}` that its manifest.json names",
                self.file.display()
            ))
        })
    }

    fn reader(&self, name: &str) -> Result<impl Read + Send + 'static, OciError> {
        let (at, len) = self.member(name)?;
        let mut f =
            File::open(&self.file).map_err(|e| OciError::io("cannot open", &self.file, e))?;
        f.seek(SeekFrom::Start(at))
            .map_err(|e| OciError::io("cannot read", &self.file, e))?;
        Ok(f.take(len))
    }

    fn read_small(&self, name: &str, max: u64) -> Result<Vec<u8>, OciError> {
        let (_, len) = self.member(name)?;
        if len > max {
            return Err(OciError::Limit {
                what: format!("{name} in {}", self.file.display()),
                limit: max,
                detail: format!("it is {len} bytes"),
            });
        }
        let mut v = Vec::new();
        self.reader(name)?
            .read_to_end(&mut v)
            .map_err(|e| OciError::io("cannot read", &self.file, e))?;
        Ok(v)
    }
}

impl Source for Archive {
    fn resolve(&mut self, _platform: &Platform) -> Result<Resolved, OciError> {
        let bytes = self.read_small("manifest.json", MAX_MANIFEST_BYTES)?;
        let entries: Vec<Entry> = serde_json::from_slice(&bytes).map_err(|e| {
            OciError::Invalid(format!(
                "manifest.json of {} does not parse: {e}",
                self.file.display()
            ))
        })?;
        let tags = |e: &Entry| e.repo_tags.clone().unwrap_or_default();
        let entry = match &self.select {
            Some(want) => entries
                .iter()
                .find(|e| {
                    tags(e)
                        .iter()
                        .any(|t| t == want || t.ends_with(&format!("/{want}")))
                })
                .ok_or_else(|| {
                    OciError::NotFound(format!(
                        "{} has no image tagged `{want}` (it has: {})",
                        self.file.display(),
                        entries.iter().flat_map(tags).collect::<Vec<_>>().join(", ")
                    ))
                })?,
            None if entries.len() == 1 => &entries[0],
            None => {
                return Err(OciError::Invalid(format!(
                    "{} holds {} images: name one as docker-archive:FILE:REPO:TAG",
                    self.file.display(),
                    entries.len()
                )))
            }
        };
        let config = self.read_small(&entry.config, MAX_CONFIG_BYTES)?;
        let layers = entry
            .layers
            .iter()
            .map(|l| {
                let (_, size) = self.member(l)?;
                Ok(LayerDesc {
                    digest: None,
                    size: Some(size),
                    media_type: String::new(),
                    name: l.clone(),
                })
            })
            .collect::<Result<Vec<_>, OciError>>()?;
        let suggested_name = tags(entry)
            .first()
            .map(|t| super::super::reference::repo_name(t));
        Ok(Resolved {
            manifest_digest: None,
            config_digest: Digest::of(&config),
            config,
            layers,
            suggested_name,
        })
    }

    fn open(&mut self, layer: &LayerDesc) -> Result<Box<dyn Read + Send>, OciError> {
        Ok(Box::new(self.reader(&layer.name)?))
    }
}
