//! A registry (distribution API v2) through `oci-client`: token and basic
//! auth, HTTPS (plain HTTP only when asked), manifests checked against
//! their digests, layer blobs streamed into the applier.
//!
//! Credentials come from the Docker config (`$DOCKER_CONFIG/config.json`,
//! else `~/.docker/config.json`: `auths`, `credHelpers`, `credsStore`)
//! through `docker_credential`; a 401 names the file that was read.

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::mpsc;

use futures_util::StreamExt;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::manifest::OciDescriptor;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use oci_spec::image::Descriptor;
use tokio::runtime::Handle;

use super::{
    check_blob, digest_of, layers_of, resolve_manifest, LayerDesc, Platform, Resolved, Source,
    MAX_MANIFEST_BYTES,
};
use crate::oci::digest::Digest;
use crate::oci::error::OciError;
use crate::oci::image::MAX_CONFIG_BYTES;
use crate::oci::OciOptions;

const ACCEPT: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

pub struct Registry {
    client: Client,
    reference: Reference,
    auth: RegistryAuth,
    config_path: String,
    insecure: bool,
    rt: Handle,
}

/// The Docker config file cairn reads credentials from.
pub fn docker_config_path() -> Option<PathBuf> {
    std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))
        .map(|d| d.join("config.json"))
}

/// Credentials for `registry` from the Docker config, anonymous if none.
fn credentials(registry: &str, path: &Option<PathBuf>) -> Result<RegistryAuth, OciError> {
    use docker_credential::{CredentialRetrievalError as E, DockerCredential};
    let Some(path) = path else {
        return Ok(RegistryAuth::Anonymous);
    };
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(RegistryAuth::Anonymous),
        Err(e) => return Err(OciError::io("cannot read the Docker config", path, e)),
    };
    let server = if registry == "docker.io" || registry == "index.docker.io" {
        "https://index.docker.io/v1/"
    } else {
        registry
    };
    match docker_credential::get_credential_from_reader(io::BufReader::new(file), server) {
        Ok(DockerCredential::UsernamePassword(u, p)) => Ok(RegistryAuth::Basic(u, p)),
        // Docker sends an identity token as the password of user `<token>`.
        Ok(DockerCredential::IdentityToken(t)) => Ok(RegistryAuth::Basic("<token>".into(), t)),
        Err(E::NoCredentialConfigured) => Ok(RegistryAuth::Anonymous),
        Err(e) => Err(OciError::Invalid(format!(
            "credentials for {registry} in {}: {e}",
            path.display()
        ))),
    }
}

impl Registry {
    pub fn open(reference: &str, opts: &OciOptions) -> Result<Registry, OciError> {
        let parsed: Reference = reference.parse().map_err(|e| OciError::Reference {
            reference: format!("docker://{reference}"),
            reason: format!("{e}"),
        })?;
        let path = opts.docker_config.clone().or_else(docker_config_path);
        let auth = credentials(parsed.resolve_registry(), &path)?;
        let client = Client::new(ClientConfig {
            protocol: if opts.insecure {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            ..ClientConfig::default()
        });
        Ok(Registry {
            client,
            reference: parsed,
            auth,
            config_path: path.map_or_else(
                || "no Docker config (HOME is unset)".into(),
                |p| p.display().to_string(),
            ),
            insecure: opts.insecure,
            rt: opts.runtime.clone(),
        })
    }

    fn registry(&self) -> String {
        self.reference.resolve_registry().to_owned()
    }

    fn map_err(&self, e: oci_client::errors::OciDistributionError) -> OciError {
        use oci_client::errors::OciDistributionError as E;
        let registry = self.registry();
        let auth = |reason: String| OciError::Auth {
            registry: registry.clone(),
            reason,
            config: self.config_path.clone(),
        };
        match e {
            E::AuthenticationFailure(m) => auth(m),
            E::UnauthorizedError { url } => auth(format!("401 Unauthorized at {url}")),
            E::ServerError {
                code: 401 | 403,
                url,
                message,
            } => auth(format!("HTTP {code} at {url}: {message}", code = 401)),
            E::RegistryError { envelope, url }
                if envelope.errors.iter().any(|x| {
                    matches!(
                        x.code,
                        oci_client::errors::OciErrorCode::Unauthorized
                            | oci_client::errors::OciErrorCode::Denied
                    )
                }) =>
            {
                auth(format!("{envelope} at {url}"))
            }
            E::ImageManifestNotFoundError(m) => OciError::NotFound(format!(
                "registry {registry}: no manifest for {}: {m}",
                self.reference
            )),
            e => {
                let mut reason = crate::error::DisplayChain(&e).to_string();
                if matches!(e, E::RequestError(_)) && !self.insecure {
                    reason += " (over HTTPS; if the registry speaks plain HTTP, pass --insecure)";
                }
                OciError::Registry { registry, reason }
            }
        }
    }

    fn by_digest(&self, digest: &Digest) -> Reference {
        Reference::with_digest(
            self.reference.registry().to_owned(),
            self.reference.repository().to_owned(),
            digest.to_string(),
        )
    }

    fn manifest(&self, r: &Reference) -> Result<Vec<u8>, OciError> {
        let (bytes, _) = self
            .rt
            .block_on(self.client.pull_manifest_raw(r, &self.auth, ACCEPT))
            .map_err(|e| self.map_err(e))?;
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(OciError::Limit {
                what: format!("manifest {r}"),
                limit: MAX_MANIFEST_BYTES,
                detail: format!("{} bytes", bytes.len()),
            });
        }
        Ok(bytes.to_vec())
    }

    fn oci_descriptor(d: &Digest, size: u64, media_type: &str) -> OciDescriptor {
        OciDescriptor {
            media_type: media_type.to_owned(),
            digest: d.to_string(),
            size: size as i64,
            ..OciDescriptor::default()
        }
    }
}

impl Source for Registry {
    fn resolve(&mut self, platform: &Platform) -> Result<Resolved, OciError> {
        let first = self.manifest(&self.reference)?;
        let first_digest = Digest::of(&first);
        if let Some(want) = self.reference.digest() {
            if want != first_digest.as_str() {
                return Err(OciError::Digest {
                    what: format!("manifest {}", self.reference),
                    expected: want.to_owned(),
                    actual: first_digest.to_string(),
                });
            }
        }
        let (manifest, manifest_digest) =
            resolve_manifest((first, Some(first_digest)), platform, |d: &Descriptor| {
                let digest = digest_of(d)?;
                let bytes = self.manifest(&self.by_digest(&digest))?;
                check_blob("manifest", &bytes, &digest, d.size())?;
                Ok(bytes)
            })?;
        let cd = manifest.config();
        let config_digest = digest_of(cd)?;
        if cd.size() > MAX_CONFIG_BYTES {
            return Err(OciError::Limit {
                what: format!("config {config_digest}"),
                limit: MAX_CONFIG_BYTES,
                detail: format!("its descriptor says {} bytes", cd.size()),
            });
        }
        let mut config = Vec::new();
        self.rt
            .block_on(self.client.pull_blob(
                &self.reference,
                &Self::oci_descriptor(&config_digest, cd.size(), cd.media_type().as_ref()),
                &mut config,
            ))
            .map_err(|e| self.map_err(e))?;
        check_blob("config", &config, &config_digest, cd.size())?;
        Ok(Resolved {
            manifest_digest,
            config_digest,
            config,
            layers: layers_of(&manifest)?,
            suggested_name: None,
        })
    }

    fn open(&mut self, layer: &LayerDesc) -> Result<Box<dyn Read + Send>, OciError> {
        let digest = layer.digest.as_ref().expect("registry layers have digests");
        let desc = Self::oci_descriptor(digest, layer.size.unwrap_or(0), &layer.media_type);
        let stream = self
            .rt
            .block_on(self.client.pull_blob_stream(&self.reference, &desc))
            .map_err(|e| self.map_err(e))?;
        let (tx, rx) = mpsc::sync_channel::<io::Result<bytes::Bytes>>(16);
        let mut stream = stream.stream;
        self.rt.spawn(async move {
            while let Some(item) = stream.next().await {
                let stop = item.is_err();
                // The reader stops when it has what it needs.
                if tx.send(item).is_err() || stop {
                    return;
                }
            }
        });
        Ok(Box::new(ChannelReader {
            rx,
            cur: bytes::Bytes::new(),
        }))
    }
}

/// Bytes arriving from a task on the runtime, read by a plain thread.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<bytes::Bytes>>,
    cur: bytes::Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(Ok(b)) => self.cur = b,
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        bytes::Buf::advance(&mut self.cur, n);
        Ok(n)
    }
}
