//! What cairn keeps beside an image's root disk: the image's run config
//! (Env, WorkingDir, Entrypoint, Cmd, User, Labels, ...) and where it came
//! from. Stored as JSON in the disk manifest's `meta` (so it is part of
//! the manifest id), format in `docs/formats/image-config.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "cairn.image/1";
/// Largest image config (JSON) cairn reads.
pub const MAX_CONFIG_BYTES: u64 = 8 << 20;

/// The run configuration, as OCI and Docker image configs spell it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<serde_json::Value>,
}

/// The parts of an image config file cairn reads.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConfigFile {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub variant: Option<String>,
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub config: Option<RunConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

/// One layer as the source described it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRecord {
    /// The blob digest (registry, layout) or the path in a docker archive.
    pub digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_id: Option<String>,
    pub size: u64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub media_type: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceRecord {
    /// The reference as given (`docker://...`, `oci:...`, `docker-archive:...`, a build).
    pub reference: String,
    /// The image manifest's digest, when the source has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_digest: Option<String>,
    pub config_digest: String,
    pub platform: String,
    pub layers: Vec<LayerRecord>,
}

/// Everything stored beside the disk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageMeta {
    pub format: String,
    pub config: RunConfig,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    pub source: SourceRecord,
    /// The Dockerfile of a `cairn image build`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dockerfile: Option<String>,
}

impl ImageMeta {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain data serializes")
    }

    /// The meta of a disk manifest: `None` when it holds none (a raw
    /// import), an error when it is not cairn image metadata.
    pub fn decode(meta: &[u8]) -> Option<Result<ImageMeta, String>> {
        if meta.is_empty() {
            return None;
        }
        Some(
            serde_json::from_slice::<ImageMeta>(meta)
                .map_err(|e| format!("image metadata is not readable: {e}"))
                .and_then(|m| {
                    if m.format == FORMAT {
                        Ok(m)
                    } else {
                        Err(format!(
                            "image metadata format `{}` is not `{FORMAT}`: upgrade cairn",
                            m.format
                        ))
                    }
                }),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_round_trips_and_docker_fields_are_kept() {
        let cfg: ConfigFile = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","config":{"Env":["A=1"],"Cmd":["sh"],
            "Shell":["/bin/bash","-c"],"ExposedPorts":{"80/tcp":{}},"Labels":{"b":"2","a":"1"}},
            "rootfs":{"type":"layers","diff_ids":["sha256:00"]}}"#,
        )
        .unwrap();
        let m = ImageMeta {
            format: FORMAT.into(),
            config: cfg.config.unwrap(),
            ..ImageMeta::default()
        };
        let back = ImageMeta::decode(&m.encode()).unwrap().unwrap();
        assert_eq!(back, m);
        assert_eq!(back.config.shell.unwrap()[0], "/bin/bash");
        assert!(ImageMeta::decode(b"").is_none());
        assert!(ImageMeta::decode(b"{}").unwrap().is_err());
    }
}
