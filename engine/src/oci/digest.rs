//! Content digests (`sha256:<hex>`) and a reader that checks one.

use std::fmt;
use std::io::{self, Read};
use std::str::FromStr;

use sha2::{Digest as _, Sha256};

use super::error::OciError;

/// A validated `sha256:` digest: safe to use as a file name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }

    pub fn of(bytes: &[u8]) -> Digest {
        Digest(format!("sha256:{}", hex::encode(Sha256::digest(bytes))))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Short form for progress lines.
    pub fn short(&self) -> &str {
        &self.0[..("sha256:".len() + 12)]
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Digest {
    type Err = OciError;
    fn from_str(s: &str) -> Result<Digest, OciError> {
        let ok = s.strip_prefix("sha256:").is_some_and(|h| {
            h.len() == 64
                && h.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if ok {
            Ok(Digest(s.to_owned()))
        } else {
            Err(OciError::Unsupported(format!(
                "digest `{}` is not sha256:<64 lowercase hex digits> (the only algorithm cairn accepts)",
                s.chars().take(100).collect::<String>()
            )))
        }
    }
}

/// Hashes what passes through and counts it; refuses to read past `limit`.
pub struct Verify<R> {
    inner: R,
    hash: Sha256,
    pub count: u64,
    limit: u64,
}

impl<R: Read> Verify<R> {
    pub fn new(inner: R, limit: u64) -> Verify<R> {
        Verify {
            inner,
            hash: Sha256::new(),
            count: 0,
            limit,
        }
    }

    /// Reads what is left, then the digest of everything read.
    pub fn finish(mut self) -> io::Result<(Digest, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        let d = Digest(format!("sha256:{}", hex::encode(self.hash.finalize())));
        Ok((d, self.count))
    }
}

impl<R: Read> Read for Verify<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than the {} bytes expected", self.limit),
            ));
        }
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked_and_reads_capped() {
        assert!("sha256:../../etc".parse::<Digest>().is_err());
        assert!(format!("sha256:{}", "A".repeat(64))
            .parse::<Digest>()
            .is_err());
        let d = Digest::of(b"abc");
        assert_eq!(d.as_str().parse::<Digest>().unwrap(), d);
        let (got, n) = Verify::new(&b"abc"[..], 3).finish().unwrap();
        assert_eq!((got, n), (d, 3));
        assert!(Verify::new(&b"abcd"[..], 3).finish().is_err());
    }
}
