//! Content addresses: BLAKE3-256 digests of uncompressed bytes, as typed ids.

use std::fmt;
use std::str::FromStr;

/// Why a string is not a valid id.
#[derive(Debug, thiserror::Error)]
#[error("`{text}` is not a {kind} id: expected 64 lowercase hex digits")]
pub struct ParseIdError {
    kind: &'static str,
    text: String,
}

macro_rules! digest_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; 32]);

        impl $name {
            /// The id of `bytes`: their BLAKE3-256 digest.
            pub fn of(bytes: &[u8]) -> Self {
                Self(*blake3::hash(bytes).as_bytes())
            }

            pub const fn from_bytes(bytes: [u8; 32]) -> Self {
                Self(bytes)
            }

            pub const fn as_bytes(&self) -> &[u8; 32] {
                &self.0
            }

            pub fn to_hex(&self) -> String {
                hex::encode(self.0)
            }

            /// The first 12 hex digits, for humans.
            pub fn short(&self) -> String {
                hex::encode(&self.0[..6])
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.to_hex())
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.short())
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                let err = || ParseIdError { kind: $kind, text: s.to_owned() };
                if s.len() != 64 || s.bytes().any(|b| b.is_ascii_uppercase()) {
                    return Err(err());
                }
                let mut out = [0u8; 32];
                hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
                Ok(Self(out))
            }
        }
    };
}

digest_id!(
    /// The id of a chunk: BLAKE3-256 of its uncompressed bytes.
    ChunkId,
    "chunk"
);
digest_id!(
    /// The id of a manifest (and so of the image or snapshot it describes):
    /// BLAKE3-256 of its canonical encoding.
    ManifestId,
    "manifest"
);
digest_id!(
    /// The id of a pack: BLAKE3-256 of its encoded index.
    PackId,
    "pack"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_rejects_bad_text() {
        let id = ChunkId::of(b"hello");
        assert_eq!(id.to_hex(), blake3::hash(b"hello").to_hex().as_str());
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
        assert!("abc".parse::<ChunkId>().is_err());
        assert!(id.to_hex().to_uppercase().parse::<ChunkId>().is_err());
        assert!("g".repeat(64).parse::<ChunkId>().is_err());
    }
}
