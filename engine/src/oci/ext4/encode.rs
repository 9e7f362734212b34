//! ext4 on-disk structures, as bytes: superblock, group descriptors,
//! inodes, extent trees, directory blocks, extended attributes and the
//! journal superblock. Little-endian except the journal (big-endian).
//! Field offsets follow the kernel's `fs/ext4/ext4.h` and `xattr.h` and
//! `include/linux/jbd2.h`; no metadata checksums are written (the file
//! system does not enable `metadata_csum`).

use super::{BLOCK, BLOCKS_PER_GROUP, INODES_PER_GROUP, INODE_SIZE};

pub const SUPER_MAGIC: u16 = 0xEF53;
pub const EXTENT_MAGIC: u16 = 0xF30A;
pub const XATTR_MAGIC: u32 = 0xEA02_0000;
pub const JOURNAL_MAGIC: u32 = 0xC03B_3998;
pub const EXTENTS_FL: u32 = 0x8_0000;
pub const EXTRA_ISIZE: u16 = 32;
pub const JOURNAL_INO: u32 = 8;
pub const ROOT_INO: u32 = 2;
pub const LOST_FOUND_INO: u32 = 11;
pub const FIRST_INO: u32 = 11;
/// Extents in the inode's `i_block`, and in one tree block.
pub const INODE_EXTENTS: usize = 4;
pub const BLOCK_EXTENTS: usize = (BLOCK as usize - 12) / 12;
/// Blocks one extent can cover.
pub const MAX_EXTENT_LEN: u64 = 32768;

const COMPAT_HAS_JOURNAL: u32 = 0x4;
const COMPAT_EXT_ATTR: u32 = 0x8;
const COMPAT_DIR_INDEX: u32 = 0x20;
const INCOMPAT_FILETYPE: u32 = 0x2;
const INCOMPAT_EXTENTS: u32 = 0x40;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x1;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_HUGE_FILE: u32 = 0x8;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x40;

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put32be(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

/// What the superblock says beyond the fixed geometry.
pub struct SuperInfo {
    pub blocks: u64,
    pub groups: u32,
    pub free_blocks: u64,
    pub free_inodes: u64,
    pub uuid: [u8; 16],
    pub hash_seed: [u8; 16],
    pub time: u32,
    pub volume_name: [u8; 16],
    /// The journal inode's `i_block` and size, backed up in the superblock.
    pub journal_backup: [u32; 17],
}

/// The 1024-byte superblock of group `group` (0, or a backup's number).
pub fn superblock(s: &SuperInfo, group: u32) -> [u8; 1024] {
    let mut b = [0u8; 1024];
    put32(&mut b, 0x00, s.groups * INODES_PER_GROUP);
    put32(&mut b, 0x04, s.blocks as u32);
    put32(&mut b, 0x0C, s.free_blocks as u32);
    put32(&mut b, 0x10, s.free_inodes as u32);
    put32(&mut b, 0x14, 0); // first data block
    put32(&mut b, 0x18, 2); // 1024 << 2 = 4096
    put32(&mut b, 0x1C, 2);
    put32(&mut b, 0x20, BLOCKS_PER_GROUP as u32);
    put32(&mut b, 0x24, BLOCKS_PER_GROUP as u32);
    put32(&mut b, 0x28, INODES_PER_GROUP);
    put32(&mut b, 0x2C, 0); // mount time
    put32(&mut b, 0x30, s.time); // write time
    put16(&mut b, 0x34, 0); // mount count
    put16(&mut b, 0x36, 0xFFFF); // max mount count: no forced checks
    put16(&mut b, 0x38, SUPER_MAGIC);
    put16(&mut b, 0x3A, 1); // clean
    put16(&mut b, 0x3C, 1); // on errors: continue
    put32(&mut b, 0x40, s.time); // last check
    put32(&mut b, 0x4C, 1); // dynamic revision
    put32(&mut b, 0x54, FIRST_INO);
    put16(&mut b, 0x58, INODE_SIZE as u16);
    put16(&mut b, 0x5A, group as u16);
    put32(
        &mut b,
        0x5C,
        COMPAT_HAS_JOURNAL | COMPAT_EXT_ATTR | COMPAT_DIR_INDEX,
    );
    put32(&mut b, 0x60, INCOMPAT_FILETYPE | INCOMPAT_EXTENTS);
    put32(
        &mut b,
        0x64,
        RO_COMPAT_SPARSE_SUPER
            | RO_COMPAT_LARGE_FILE
            | RO_COMPAT_HUGE_FILE
            | RO_COMPAT_DIR_NLINK
            | RO_COMPAT_EXTRA_ISIZE,
    );
    b[0x68..0x78].copy_from_slice(&s.uuid);
    b[0x78..0x88].copy_from_slice(&s.volume_name);
    put32(&mut b, 0xE0, JOURNAL_INO);
    b[0xEC..0xFC].copy_from_slice(&s.hash_seed);
    b[0xFC] = 1; // half_md4 directory hashes
    b[0xFD] = 1; // s_jnl_blocks holds a backup of the journal inode
    put32(&mut b, 0x100, 0x000C); // user_xattr, acl
    put32(&mut b, 0x108, s.time); // mkfs time
    for (i, v) in s.journal_backup.iter().enumerate() {
        put32(&mut b, 0x10C + 4 * i, *v);
    }
    put16(&mut b, 0x15C, EXTRA_ISIZE);
    put16(&mut b, 0x15E, EXTRA_ISIZE);
    put32(&mut b, 0x160, 0x1); // signed directory hash
    b
}

/// One 32-byte group descriptor.
pub struct GroupDesc {
    pub block_bitmap: u32,
    pub inode_bitmap: u32,
    pub inode_table: u32,
    pub free_blocks: u16,
    pub free_inodes: u16,
    pub dirs: u16,
}

pub fn group_desc(g: &GroupDesc, out: &mut [u8]) {
    put32(out, 0x00, g.block_bitmap);
    put32(out, 0x04, g.inode_bitmap);
    put32(out, 0x08, g.inode_table);
    put16(out, 0x0C, g.free_blocks);
    put16(out, 0x0E, g.free_inodes);
    put16(out, 0x10, g.dirs);
}

/// A run of blocks: `len` blocks from `start`, at file block `logical`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    pub logical: u32,
    pub start: u64,
    pub len: u64,
}

fn extent_header(out: &mut [u8], entries: usize, max: usize, depth: u16) {
    put16(out, 0, EXTENT_MAGIC);
    put16(out, 2, entries as u16);
    put16(out, 4, max as u16);
    put16(out, 6, depth);
}

fn extent_leaf(out: &mut [u8], e: &Extent) {
    put32(out, 0, e.logical);
    put16(out, 4, e.len as u16);
    put16(out, 6, (e.start >> 32) as u16);
    put32(out, 8, e.start as u32);
}

/// Tree blocks needed for `n` extents (0 while they fit in the inode).
pub fn extent_tree_blocks(n: usize) -> usize {
    if n <= INODE_EXTENTS {
        0
    } else {
        n.div_ceil(BLOCK_EXTENTS)
    }
}

/// Fills `i_block` (60 bytes) with the extent tree of `extents`; the leaf
/// blocks (when more than 4 extents) go to `leaves`, one per block given.
pub fn extent_tree(
    extents: &[Extent],
    leaves: &[u64],
    i_block: &mut [u8],
) -> Result<Vec<(u64, Vec<u8>)>, String> {
    if extents.len() <= INODE_EXTENTS {
        extent_header(i_block, extents.len(), INODE_EXTENTS, 0);
        for (i, e) in extents.iter().enumerate() {
            extent_leaf(&mut i_block[12 + 12 * i..], e);
        }
        return Ok(Vec::new());
    }
    let groups: Vec<&[Extent]> = extents.chunks(BLOCK_EXTENTS).collect();
    if groups.len() > INODE_EXTENTS || groups.len() != leaves.len() {
        return Err(format!(
            "a file of {} extents needs a deeper extent tree than cairn writes",
            extents.len()
        ));
    }
    extent_header(i_block, groups.len(), INODE_EXTENTS, 1);
    let mut out = Vec::new();
    for (i, (g, &leaf)) in groups.iter().zip(leaves).enumerate() {
        let idx = &mut i_block[12 + 12 * i..12 + 12 * (i + 1)];
        put32(idx, 0, g[0].logical);
        put32(idx, 4, leaf as u32);
        put16(idx, 8, (leaf >> 32) as u16);
        let mut blk = vec![0u8; BLOCK as usize];
        extent_header(&mut blk, g.len(), BLOCK_EXTENTS, 0);
        for (j, e) in g.iter().enumerate() {
            extent_leaf(&mut blk[12 + 12 * j..], e);
        }
        out.push((leaf, blk));
    }
    Ok(out)
}

/// What goes into one inode.
pub struct InodeInfo<'a> {
    /// Full mode: type and permission bits.
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u16,
    /// In 512-byte sectors.
    pub sectors: u64,
    pub flags: u32,
    pub mtime: (i64, u32),
    pub i_block: &'a [u8; 60],
    pub xattr_block: u64,
    /// The in-inode extended attribute area (after the 4-byte magic), or empty.
    pub ibody_xattrs: &'a [u8],
}

/// The seconds field and the `_extra` field (epoch bits and nanoseconds).
fn time_fields(sec: i64, nsec: u32) -> (u32, u32) {
    let lo = sec as i32;
    let epoch = ((sec - i64::from(lo)) >> 32) as u32 & 3;
    (lo as u32, (nsec.min(999_999_999) << 2) | epoch)
}

pub fn inode(i: &InodeInfo, out: &mut [u8]) {
    out[..INODE_SIZE].fill(0);
    put16(out, 0x00, i.mode);
    put16(out, 0x02, i.uid as u16);
    put32(out, 0x04, i.size as u32);
    let (t, extra) = time_fields(i.mtime.0, i.mtime.1);
    for at in [0x08, 0x0C, 0x10] {
        put32(out, at, t);
    }
    put16(out, 0x18, i.gid as u16);
    put16(out, 0x1A, i.links);
    put32(out, 0x1C, i.sectors as u32);
    put32(out, 0x20, i.flags);
    out[0x28..0x64].copy_from_slice(i.i_block);
    put32(out, 0x68, i.xattr_block as u32);
    put32(out, 0x6C, (i.size >> 32) as u32);
    put16(out, 0x74, (i.sectors >> 32) as u16);
    put16(out, 0x76, (i.xattr_block >> 32) as u16);
    put16(out, 0x78, (i.uid >> 16) as u16);
    put16(out, 0x7A, (i.gid >> 16) as u16);
    put16(out, 0x80, EXTRA_ISIZE);
    for at in [0x84, 0x88, 0x8C] {
        put32(out, at, extra);
    }
    put32(out, 0x90, t); // creation time
    put32(out, 0x94, extra);
    if !i.ibody_xattrs.is_empty() {
        let at = 128 + EXTRA_ISIZE as usize;
        put32(out, at, XATTR_MAGIC);
        out[at + 4..at + 4 + i.ibody_xattrs.len()].copy_from_slice(i.ibody_xattrs);
    }
}

/// Bytes for the in-inode attributes after the magic.
pub const IBODY_XATTR_SPACE: usize = INODE_SIZE - 128 - EXTRA_ISIZE as usize - 4;

/// Device numbers in `i_block` as the kernel writes them.
pub fn device_block(major: u32, minor: u32) -> [u8; 60] {
    let mut b = [0u8; 60];
    if major < 256 && minor < 256 {
        put32(&mut b, 0, (major << 8) | minor);
    } else {
        put32(
            &mut b,
            4,
            (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12),
        );
    }
    b
}

/// Directory entry file types.
pub const FT_REG: u8 = 1;
pub const FT_DIR: u8 = 2;
pub const FT_CHR: u8 = 3;
pub const FT_BLK: u8 = 4;
pub const FT_FIFO: u8 = 5;
pub const FT_LNK: u8 = 7;

fn rec_len(name_len: usize) -> usize {
    (8 + name_len + 3) & !3
}

/// Packs directory entries into blocks, in order, the last entry of each
/// block stretched to its end; `emit` is given each finished block.
pub fn pack_dir<'a>(
    entries: impl Iterator<Item = (&'a [u8], u32, u8)>,
    mut emit: impl FnMut(Vec<u8>),
) {
    let mut blk = vec![0u8; BLOCK as usize];
    let mut used = 0usize;
    let mut last = 0usize;
    for (name, ino, ft) in entries {
        let need = rec_len(name.len());
        if used + need > BLOCK as usize {
            put16(&mut blk, last + 4, (BLOCK as usize - last) as u16);
            emit(std::mem::replace(&mut blk, vec![0u8; BLOCK as usize]));
            used = 0;
        }
        put32(&mut blk, used, ino);
        put16(&mut blk, used + 4, need as u16);
        blk[used + 6] = name.len() as u8;
        blk[used + 7] = ft;
        blk[used + 8..used + 8 + name.len()].copy_from_slice(name);
        last = used;
        used += need;
    }
    if used > 0 {
        put16(&mut blk, last + 4, (BLOCK as usize - last) as u16);
        emit(blk);
    }
}

/// Blocks `pack_dir` fills for entries with these name lengths.
pub fn dir_blocks(name_lens: impl Iterator<Item = usize>) -> u64 {
    let mut blocks = 0;
    let mut used = BLOCK as usize;
    for n in name_lens {
        let need = rec_len(n);
        if used + need > BLOCK as usize {
            blocks += 1;
            used = 0;
        }
        used += need;
    }
    blocks
}

/// An empty directory block (lost+found's spare blocks).
pub fn empty_dir_block() -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    put16(&mut b, 4, BLOCK as u16);
    b
}

/// The journal superblock (JBD2 v2, clean, empty) of a `blocks`-block journal.
pub fn journal_superblock(blocks: u32, uuid: &[u8; 16]) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK as usize];
    put32be(&mut b, 0x00, JOURNAL_MAGIC);
    put32be(&mut b, 0x04, 4); // superblock v2
    put32be(&mut b, 0x0C, BLOCK as u32);
    put32be(&mut b, 0x10, blocks);
    put32be(&mut b, 0x14, 1); // first log block
    put32be(&mut b, 0x18, 1); // first expected sequence
    b[0x30..0x40].copy_from_slice(uuid);
    put32be(&mut b, 0x40, 1); // users
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_block_count_matches_packing() {
        for lens in [
            vec![1usize, 2],
            vec![255; 40],
            (0..700).map(|i| i % 37 + 1).collect(),
        ] {
            let names: Vec<Vec<u8>> = lens.iter().map(|&n| vec![b'a'; n]).collect();
            let mut n = 0;
            pack_dir(names.iter().map(|v| (v.as_slice(), 12, FT_REG)), |_| n += 1);
            assert_eq!(dir_blocks(lens.into_iter()), n);
        }
    }

    #[test]
    fn times_past_2038_use_the_epoch_bits() {
        assert_eq!(time_fields(1_700_000_000, 5), (1_700_000_000, 5 << 2));
        let (lo, extra) = time_fields(1 << 32, 0);
        assert_eq!((lo, extra & 3), (0, 1));
        let (lo, extra) = time_fields(-1, 0);
        assert_eq!((lo, extra & 3), (u32::MAX, 0));
    }
}
