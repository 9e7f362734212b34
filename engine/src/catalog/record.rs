//! One catalog record: a small JSON object at one key, taken with a
//! conditional create and changed only by compare-and-swap.
//!
//! A record is an envelope `{"format":1,"kind":K,"record":{..}}`; a
//! removed name keeps its key as a tombstone `{"format":1,"kind":K,
//! "removed":{..}}`, so that taking the name again is a compare-and-swap
//! on the tombstone and never races an unconditional delete. A write
//! whose answer was lost (a timeout, then a retry that finds the
//! precondition failed) is recognized by reading the key back: every
//! envelope carries a random write nonce, so equal bytes mean the write
//! was ours.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::CatalogError;
use crate::objstore::{Conditional, ObjectStore, Precondition, Version};

/// The record format this build writes and reads.
pub const FORMAT: u32 = 1;
/// Records are small; a larger object at a catalog key is refused unread.
pub const MAX_RECORD_BYTES: usize = 64 << 10;
/// Compare-and-swap attempts before an update gives up as contended.
const MAX_ATTEMPTS: u32 = 64;

/// A kind of record, by the name its envelope carries.
pub trait Kind: Serialize + DeserializeOwned + Clone {
    const KIND: &'static str;
}

/// Who removed a name, and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removed {
    pub at: String,
    pub by: String,
}

#[derive(Serialize, Deserialize)]
#[serde(bound(deserialize = "T: DeserializeOwned"))]
struct Envelope<T> {
    format: u32,
    kind: String,
    /// Unique per write (see the module docs).
    write: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    record: Option<T>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    removed: Option<Removed>,
}

/// What a key holds.
pub enum Entry<T> {
    Live(T),
    Removed(Removed),
}

/// A live record and the version it was read at.
#[derive(Debug, Clone)]
pub struct Stored<T> {
    pub record: T,
    pub version: Version,
}

fn encode<T: Kind>(record: Option<&T>, removed: Option<&Removed>) -> Bytes {
    let env = Envelope {
        format: FORMAT,
        kind: T::KIND.to_owned(),
        write: nonce(),
        record,
        removed: removed.cloned(),
    };
    Bytes::from(serde_json::to_vec(&env).expect("catalog records serialize"))
}

fn decode<T: Kind>(key: &str, data: &[u8]) -> Result<Entry<T>, CatalogError> {
    let bad = |detail: String| CatalogError::BadRecord {
        key: key.to_owned(),
        detail,
    };
    if data.len() > MAX_RECORD_BYTES {
        return Err(bad(format!(
            "{} bytes, more than a record's {MAX_RECORD_BYTES}",
            data.len()
        )));
    }
    let env: Envelope<T> = serde_json::from_slice(data).map_err(|e| bad(e.to_string()))?;
    if env.format != FORMAT {
        return Err(bad(format!(
            "format {}, this build reads {FORMAT}",
            env.format
        )));
    }
    if env.kind != T::KIND {
        return Err(bad(format!("a {} record, expected {}", env.kind, T::KIND)));
    }
    match (env.record, env.removed) {
        (Some(r), None) => Ok(Entry::Live(r)),
        (None, Some(r)) => Ok(Entry::Removed(r)),
        _ => Err(bad("neither a record nor a tombstone".to_owned())),
    }
}

/// What `key` holds, with its version; `None` if nothing.
pub async fn read<T: Kind>(
    store: &dyn ObjectStore,
    key: &str,
) -> Result<Option<(Entry<T>, Version)>, CatalogError> {
    match store.get_versioned(key).await? {
        Some(v) => Ok(Some((decode(key, &v.data)?, v.version))),
        None => Ok(None),
    }
}

/// The live record at `key`, if any (a tombstone is none): one GET.
pub async fn read_live<T: Kind>(
    store: &dyn ObjectStore,
    key: &str,
) -> Result<Option<Stored<T>>, CatalogError> {
    Ok(match read::<T>(store, key).await? {
        Some((Entry::Live(record), version)) => Some(Stored { record, version }),
        _ => None,
    })
}

/// Writes `data` if `precondition` holds; `None` if it did not. A
/// failed precondition after a lost answer is told apart by reading back.
async fn put_checked(
    store: &dyn ObjectStore,
    key: &str,
    data: Bytes,
    precondition: Precondition,
) -> Result<Option<Version>, CatalogError> {
    match store.put_if(key, data.clone(), precondition).await? {
        Conditional::Written(v) => Ok(Some(v)),
        Conditional::PreconditionFailed => Ok(match store.get_versioned(key).await? {
            Some(now) if now.data == data => Some(now.version),
            _ => None,
        }),
    }
}

/// The outcome of taking a key.
pub enum Created<T> {
    /// The key is ours now.
    Won(Version),
    /// Someone else holds it.
    Taken(Stored<T>),
}

/// Takes `key` for `record`: a conditional create, or a compare-and-swap
/// over a tombstone. Exactly one of any number of racing callers wins.
pub async fn create<T: Kind>(
    store: &dyn ObjectStore,
    key: &str,
    record: &T,
) -> Result<Created<T>, CatalogError> {
    let data = encode(Some(record), None);
    for _ in 0..MAX_ATTEMPTS {
        let precondition = match read::<T>(store, key).await? {
            None => Precondition::Absent,
            Some((Entry::Removed(_), version)) => Precondition::Matches(version),
            Some((Entry::Live(record), version)) => {
                return Ok(Created::Taken(Stored { record, version }))
            }
        };
        if let Some(v) = put_checked(store, key, data.clone(), precondition).await? {
            return Ok(Created::Won(v));
        }
    }
    Err(CatalogError::Contended {
        key: key.to_owned(),
        attempts: MAX_ATTEMPTS,
    })
}

/// Creates `key` only if nothing, not even a tombstone, is there (keys
/// that are never reused: ids). `false` if something was.
pub async fn create_fresh<T: Kind>(
    store: &dyn ObjectStore,
    key: &str,
    record: &T,
) -> Result<bool, CatalogError> {
    let data = encode(Some(record), None);
    Ok(put_checked(store, key, data, Precondition::Absent)
        .await?
        .is_some())
}

/// Read, change, compare-and-swap, until it sticks: `change` sees the
/// current record and returns the new one or refuses. `None` if the key
/// holds no live record.
pub async fn update<T: Kind>(
    store: &dyn ObjectStore,
    key: &str,
    mut change: impl FnMut(&T) -> Result<T, CatalogError>,
) -> Result<Option<Stored<T>>, CatalogError> {
    for _ in 0..MAX_ATTEMPTS {
        let Some(current) = read_live::<T>(store, key).await? else {
            return Ok(None);
        };
        let next = change(&current.record)?;
        let data = encode(Some(&next), None);
        let expect = Precondition::Matches(current.version);
        if let Some(version) = put_checked(store, key, data, expect).await? {
            return Ok(Some(Stored {
                record: next,
                version,
            }));
        }
    }
    Err(CatalogError::Contended {
        key: key.to_owned(),
        attempts: MAX_ATTEMPTS,
    })
}

/// Replaces the live record at `key` with a tombstone once `check`
/// allows it: the name can be taken again, and no write based on the old
/// record can land after this. Returns the record removed, `None` if none.
pub async fn remove<T: Kind>(
    store: &dyn ObjectStore,
    key: &str,
    by: &str,
    mut check: impl FnMut(&T) -> Result<(), CatalogError>,
) -> Result<Option<T>, CatalogError> {
    for _ in 0..MAX_ATTEMPTS {
        let Some(current) = read_live::<T>(store, key).await? else {
            return Ok(None);
        };
        check(&current.record)?;
        let removed = Removed {
            at: now(),
            by: by.to_owned(),
        };
        let data = encode::<T>(None, Some(&removed));
        let expect = Precondition::Matches(current.version);
        if put_checked(store, key, data, expect).await?.is_some() {
            return Ok(Some(current.record));
        }
    }
    Err(CatalogError::Contended {
        key: key.to_owned(),
        attempts: MAX_ATTEMPTS,
    })
}

/// Now, as RFC 3339 in UTC.
pub fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .expect("the current time formats as RFC 3339")
}

/// A random 128-bit value in hex: ids and write nonces.
pub fn nonce() -> String {
    format!("{:032x}", fastrand::u128(..))
}

/// Serde for typed ids as their text (`Display` / `FromStr`).
pub mod as_text {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};
    use std::fmt::Display;
    use std::str::FromStr;

    pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        String::deserialize(d)?.parse().map_err(D::Error::custom)
    }

    /// The same for an optional id (`null` when none).
    pub mod option {
        use super::*;

        pub fn serialize<T: Display, S: Serializer>(
            v: &Option<T>,
            s: S,
        ) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.collect_str(v),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
        where
            T: FromStr,
            T::Err: Display,
            D: Deserializer<'de>,
        {
            Option::<String>::deserialize(d)?
                .map(|s| s.parse().map_err(D::Error::custom))
                .transpose()
        }
    }
}
