//! Little-endian fields out of bytes that came from outside (packs,
//! frames, manifests, working sets, memory layouts): one checked reader on
//! `bytes::Buf`'s `try_get_*`, so that a short input is an error naming
//! where it ended, never a panic or an unchecked slice.

use bytes::Buf;

/// The input ended before a field did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("truncated at byte {at}: {wanted} bytes wanted, {left} left")]
pub struct Truncated {
    /// Offset of the field that did not fit, from the reader's start.
    pub at: usize,
    pub wanted: usize,
    pub left: usize,
}

/// Reads fields in order from a byte slice.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    rest: &'a [u8],
    len: usize,
}

impl<'a> Reader<'a> {
    pub fn new(bytes: &'a [u8]) -> Self {
        Reader {
            rest: bytes,
            len: bytes.len(),
        }
    }

    /// Bytes read so far.
    pub fn pos(&self) -> usize {
        self.len - self.rest.len()
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.rest.len()
    }

    fn truncated(&self, wanted: usize) -> Truncated {
        Truncated {
            at: self.pos(),
            wanted,
            left: self.rest.len(),
        }
    }

    pub fn u8(&mut self) -> Result<u8, Truncated> {
        let t = self.truncated(1);
        self.rest.try_get_u8().map_err(|_| t)
    }

    pub fn u16(&mut self) -> Result<u16, Truncated> {
        let t = self.truncated(2);
        self.rest.try_get_u16_le().map_err(|_| t)
    }

    pub fn u32(&mut self) -> Result<u32, Truncated> {
        let t = self.truncated(4);
        self.rest.try_get_u32_le().map_err(|_| t)
    }

    pub fn u64(&mut self) -> Result<u64, Truncated> {
        let t = self.truncated(8);
        self.rest.try_get_u64_le().map_err(|_| t)
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], Truncated> {
        if n > self.rest.len() {
            return Err(self.truncated(n));
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    /// The next `N` bytes as an array (an id, a magic number).
    pub fn array<const N: usize>(&mut self) -> Result<[u8; N], Truncated> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    /// Skips `n` bytes.
    pub fn skip(&mut self, n: usize) -> Result<(), Truncated> {
        self.take(n).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_fields_in_order_and_names_where_input_ended() {
        let bytes = [1u8, 2, 0, 3, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 9, 9];
        let mut r = Reader::new(&bytes);
        assert_eq!(r.u8(), Ok(1));
        assert_eq!(r.u16(), Ok(2));
        assert_eq!(r.u32(), Ok(3));
        assert_eq!(r.u64(), Ok(4));
        assert_eq!(r.pos(), 15);
        assert_eq!(
            r.u32(),
            Err(Truncated {
                at: 15,
                wanted: 4,
                left: 2
            })
        );
        // A failed read consumes nothing.
        assert_eq!(r.array::<2>(), Ok([9, 9]));
        assert_eq!(r.remaining(), 0);
        assert!(r.take(1).is_err());
        assert!(Reader::new(&[]).u8().is_err());
    }
}
