//! What a project, an image or sandbox name, and a record id may be.

use super::CatalogError;
use crate::id::ManifestId;

/// The project of a command that names none.
pub const DEFAULT_PROJECT: &str = "default";

const NAME_RULE: &str = "use 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-', not starting with '.', and not 32 or 64 hex digits (those are ids)";
const PROJECT_RULE: &str =
    "use 1 to 64 characters of a-z, 0-9, '_' and '-', starting with a letter or digit";

/// An image name.
pub fn check_name(name: &str) -> Result<(), CatalogError> {
    check(name, "image name")
}

/// A sandbox name (the same rule as an image name's).
pub fn check_sandbox_name(name: &str) -> Result<(), CatalogError> {
    check(name, "sandbox name")
}

fn check(name: &str, what: &'static str) -> Result<(), CatalogError> {
    let ok = (1..=128).contains(&name.len())
        && !name.starts_with('.')
        && name.parse::<ManifestId>().is_err()
        && !is_record_id(name)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CatalogError::BadName {
            what,
            name: name.to_owned(),
            rule: NAME_RULE,
        })
    }
}

pub fn check_project(project: &str) -> Result<(), CatalogError> {
    let ok = (1..=64).contains(&project.len())
        && project
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && project
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CatalogError::BadName {
            what: "project name",
            name: project.to_owned(),
            rule: PROJECT_RULE,
        })
    }
}

/// A new snapshot or sandbox id: 128 random bits, 32 lowercase hex digits.
pub fn new_id() -> String {
    super::record::nonce()
}

/// Whether `s` has the form of a snapshot or sandbox id.
pub fn is_record_id(s: &str) -> bool {
    s.len() == 32
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["debian", "a.b_c-1", "x", "deadbeef"] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        let hex64 = "a".repeat(64);
        let hex32 = "b".repeat(32);
        for bad in ["", ".hidden", "a/b", "a b", hex64.as_str(), hex32.as_str()] {
            let e = check_name(bad).unwrap_err();
            assert!(e.to_string().contains("1 to 128 characters"), "{e}");
        }
    }

    #[test]
    fn projects() {
        for ok in ["default", "team-a", "p1", "9x"] {
            assert!(check_project(ok).is_ok(), "{ok}");
        }
        for bad in ["", "Team", "-a", "a.b", "a/b", &"p".repeat(65)] {
            assert!(check_project(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn ids() {
        let id = new_id();
        assert!(is_record_id(&id), "{id}");
        assert_ne!(id, new_id());
        assert!(!is_record_id("debian"));
    }
}
