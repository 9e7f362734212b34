//! Extended attributes in ext4's layout: in the inode when they fit, else
//! in one attribute block. POSIX ACLs arrive in the kernel's xattr format
//! (as tar archives carry them) and are stored in ext4's own.

use super::encode::IBODY_XATTR_SPACE;
use super::BLOCK;
use crate::oci::ext4::encode::XATTR_MAGIC;

/// Name prefixes and their ext4 index; the full names come first.
const PREFIXES: &[(&[u8], u8)] = &[
    (b"system.posix_acl_access", 2),
    (b"system.posix_acl_default", 3),
    (b"system.richacl", 8),
    (b"user.", 1),
    (b"trusted.", 4),
    (b"security.", 6),
    (b"system.", 7),
];

/// One attribute as ext4 stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub index: u8,
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// Splits a full name into ext4's (index, suffix) and converts ACL values.
pub fn to_attr(name: &[u8], value: &[u8]) -> Result<Attr, String> {
    let show = || String::from_utf8_lossy(name).into_owned();
    let (prefix, index) = PREFIXES
        .iter()
        .find(|(p, _)| name.starts_with(p))
        .ok_or_else(|| {
            format!(
                "extended attribute `{}` is in no namespace Linux has (user., trusted., security., system.)",
                show()
            )
        })?;
    let suffix = &name[prefix.len()..];
    if suffix.len() > 255 {
        return Err(format!(
            "extended attribute name `{}` is longer than 255 bytes",
            show()
        ));
    }
    let value = if *index == 2 || *index == 3 {
        acl_to_disk(value).map_err(|e| format!("extended attribute `{}`: {e}", show()))?
    } else {
        value.to_vec()
    };
    Ok(Attr {
        index: *index,
        name: suffix.to_vec(),
        value,
    })
}

/// The kernel's POSIX ACL xattr (version 2, 8-byte entries) to ext4's
/// on-disk ACL (version 1, 4-byte entries for the owner, group, mask and
/// other classes).
fn acl_to_disk(v: &[u8]) -> Result<Vec<u8>, String> {
    if v.len() < 4 || !(v.len() - 4).is_multiple_of(8) || v[..4] != 2u32.to_le_bytes() {
        return Err("not a POSIX ACL in the kernel's xattr format (version 2)".into());
    }
    let mut out = 1u32.to_le_bytes().to_vec();
    for e in v[4..].chunks_exact(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        out.extend_from_slice(&e[..4]);
        match tag {
            0x01 | 0x04 | 0x10 | 0x20 => {}
            0x02 | 0x08 => out.extend_from_slice(&e[4..8]),
            t => return Err(format!("unknown ACL entry tag {t:#x}")),
        }
    }
    Ok(out)
}

fn entry_len(a: &Attr) -> usize {
    (16 + a.name.len() + 3) & !3
}

fn value_len(a: &Attr) -> usize {
    (a.value.len() + 3) & !3
}

/// The kernel's hash of one entry (names hashed as signed chars, as x86
/// kernels do).
fn entry_hash(a: &Attr) -> u32 {
    let mut h: u32 = 0;
    for &c in &a.name {
        h = (h << 5) ^ (h >> 27) ^ (c as i8 as i32 as u32);
    }
    let mut padded = a.value.clone();
    padded.resize(value_len(a), 0);
    for w in padded.chunks_exact(4) {
        h = (h << 16) ^ (h >> 16) ^ u32::from_le_bytes(w.try_into().expect("4 bytes"));
    }
    h
}

/// Writes entries at `out[first..]`, values from the end of `out` down;
/// value offsets are relative to `base`. Returns the entry hashes.
fn write_entries(attrs: &[Attr], out: &mut [u8], first: usize, base: usize) -> Vec<u32> {
    let mut at = first;
    let mut vend = out.len();
    let mut hashes = Vec::new();
    for a in attrs {
        vend -= value_len(a);
        out[vend..vend + a.value.len()].copy_from_slice(&a.value);
        let h = entry_hash(a);
        hashes.push(h);
        out[at] = a.name.len() as u8;
        out[at + 1] = a.index;
        let offs = if a.value.is_empty() { 0 } else { vend - base };
        out[at + 2..at + 4].copy_from_slice(&(offs as u16).to_le_bytes());
        out[at + 8..at + 12].copy_from_slice(&(a.value.len() as u32).to_le_bytes());
        out[at + 12..at + 16].copy_from_slice(&h.to_le_bytes());
        out[at + 16..at + 16 + a.name.len()].copy_from_slice(&a.name);
        at += entry_len(a);
    }
    hashes
}

/// Where a node's attributes go.
pub enum Placement {
    None,
    /// The in-inode area after its magic.
    Inode(Vec<u8>),
    /// One attribute block.
    Block(Vec<u8>),
}

/// Sorted as the kernel searches attribute blocks: index, name length, name.
pub fn place(mut attrs: Vec<Attr>) -> Result<Placement, String> {
    if attrs.is_empty() {
        return Ok(Placement::None);
    }
    attrs.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    let need: usize = attrs
        .iter()
        .map(|a| entry_len(a) + value_len(a))
        .sum::<usize>()
        + 4;
    if need <= IBODY_XATTR_SPACE {
        let mut out = vec![0u8; IBODY_XATTR_SPACE];
        write_entries(&attrs, &mut out, 0, 0);
        return Ok(Placement::Inode(out));
    }
    if need + 32 > BLOCK as usize {
        return Err(format!(
            "extended attributes of {need} bytes do not fit in one {BLOCK}-byte block"
        ));
    }
    let mut out = vec![0u8; BLOCK as usize];
    out[..4].copy_from_slice(&XATTR_MAGIC.to_le_bytes());
    out[4..8].copy_from_slice(&1u32.to_le_bytes()); // refcount
    out[8..12].copy_from_slice(&1u32.to_le_bytes()); // blocks
    let hashes = write_entries(&attrs, &mut out, 32, 0);
    let mut h: u32 = 0;
    for eh in hashes {
        if eh == 0 {
            h = 0;
            break;
        }
        h = (h << 16) ^ (h >> 16) ^ eh;
    }
    out[12..16].copy_from_slice(&h.to_le_bytes());
    Ok(Placement::Block(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capability_fits_in_the_inode() {
        let cap = to_attr(b"security.capability", &[1u8; 20]).unwrap();
        assert_eq!((cap.index, cap.name.as_slice()), (6, &b"capability"[..]));
        assert!(matches!(place(vec![cap]).unwrap(), Placement::Inode(_)));
    }

    #[test]
    fn big_sets_go_to_a_block_and_huge_ones_are_refused() {
        let a = to_attr(b"user.big", &[7u8; 500]).unwrap();
        assert!(matches!(place(vec![a]).unwrap(), Placement::Block(_)));
        let a = to_attr(b"user.huge", &[7u8; 5000]).unwrap();
        assert!(place(vec![a]).is_err());
        assert!(to_attr(b"weird.name", b"x").is_err());
    }

    #[test]
    fn acl_converts_to_the_disk_format() {
        let mut v = 2u32.to_le_bytes().to_vec();
        for (tag, perm, id) in [
            (1u16, 6u16, u32::MAX),
            (2, 4, 1000),
            (4, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 0, u32::MAX),
        ] {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        let a = to_attr(b"system.posix_acl_access", &v).unwrap();
        assert_eq!(a.index, 2);
        assert!(a.name.is_empty());
        assert_eq!(a.value.len(), 4 + 4 + 8 + 4 + 4 + 4);
    }
}
