//! Image references: where an image comes from, and its default name.
//!
//! ```text
//! docker://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]   a registry (distribution API v2)
//! oci:DIR[:TAG]                                    an OCI image layout
//! docker-archive:FILE[:REPO:TAG]                   `docker save` output
//! ```

use std::path::{Path, PathBuf};

use super::error::OciError;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// `host[:port]/repo[:tag|@digest]`, as given after `docker://`.
    Registry(String),
    Layout {
        dir: PathBuf,
        tag: Option<String>,
    },
    Archive {
        file: PathBuf,
        select: Option<String>,
    },
}

/// Splits `PATH[:SUFFIX]`: the whole text when it names an existing path,
/// else at the last colon.
fn split_path(rest: &str) -> (PathBuf, Option<String>) {
    if Path::new(rest).exists() {
        return (PathBuf::from(rest), None);
    }
    match rest.rsplit_once(':') {
        Some((p, t)) if !p.is_empty() && !t.contains('/') => (PathBuf::from(p), Some(t.to_owned())),
        _ => (PathBuf::from(rest), None),
    }
}

/// `docker-archive:FILE[:REPO:TAG]`: the file is the longest existing prefix.
fn split_archive(rest: &str) -> (PathBuf, Option<String>) {
    if Path::new(rest).exists() {
        return (PathBuf::from(rest), None);
    }
    for (i, _) in rest.match_indices(':') {
        if Path::new(&rest[..i]).is_file() {
            return (PathBuf::from(&rest[..i]), Some(rest[i + 1..].to_owned()));
        }
    }
    (PathBuf::from(rest), None)
}

impl ImageRef {
    pub fn parse(s: &str) -> Result<ImageRef, OciError> {
        let bad = |reason: &str| OciError::Reference {
            reference: s.to_owned(),
            reason: reason.to_owned(),
        };
        if let Some(rest) = s.strip_prefix("docker://") {
            if rest.is_empty() || rest.contains("://") {
                return Err(bad(
                    "expected docker://HOST[:PORT]/REPO[:TAG|@sha256:DIGEST]",
                ));
            }
            return Ok(ImageRef::Registry(rest.to_owned()));
        }
        if let Some(rest) = s.strip_prefix("oci:") {
            if rest.is_empty() {
                return Err(bad("expected oci:DIR[:TAG]"));
            }
            let (dir, tag) = split_path(rest);
            return Ok(ImageRef::Layout { dir, tag });
        }
        if let Some(rest) = s.strip_prefix("docker-archive:") {
            if rest.is_empty() {
                return Err(bad("expected docker-archive:FILE[:REPO:TAG]"));
            }
            let (file, select) = split_archive(rest);
            return Ok(ImageRef::Archive { file, select });
        }
        Err(bad(
            "it must start with docker://, oci: or docker-archive: (a cairn image name is not imported; see `cairn image ls`)",
        ))
    }

    /// The name an import takes when none is given: the last element of
    /// the repository, without tag or digest.
    pub fn default_name(&self) -> Option<String> {
        match self {
            ImageRef::Registry(r) => Some(repo_name(r)),
            ImageRef::Layout { dir, .. } => dir
                .canonicalize()
                .ok()
                .as_deref()
                .unwrap_or(dir)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned()),
            ImageRef::Archive { select, file } => match select {
                Some(s) => Some(repo_name(s)),
                None => file.file_stem().map(|n| n.to_string_lossy().into_owned()),
            },
        }
    }
}

/// `ghcr.io/org/app@sha256:...` → `app`; `pytorch/pytorch:2.4.1` → `pytorch`.
pub fn repo_name(reference: &str) -> String {
    let no_digest = reference.split('@').next().unwrap_or(reference);
    let last = no_digest.rsplit('/').next().unwrap_or(no_digest);
    last.split(':').next().unwrap_or(last).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_forms() {
        assert_eq!(repo_name("pytorch/pytorch:2.4.1"), "pytorch");
        assert_eq!(repo_name("ghcr.io/org/app@sha256:abcd"), "app");
        assert_eq!(repo_name("localhost:5000/base"), "base");
        assert_eq!(
            ImageRef::parse("docker://localhost:5000/a/b:1")
                .unwrap()
                .default_name()
                .unwrap(),
            "b"
        );
        assert_eq!(
            ImageRef::parse("oci:/nonexistent/dir:v1").unwrap(),
            ImageRef::Layout {
                dir: "/nonexistent/dir".into(),
                tag: Some("v1".into())
            }
        );
        assert!(ImageRef::parse("busybox").is_err());
        assert!(ImageRef::parse("oci:").is_err());
    }
}
