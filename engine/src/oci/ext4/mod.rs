//! The root disk: an ext4 file system written from a [`Tree`], in process
//! and deterministically (no clock, no random numbers: the UUID, hash
//! seed and times are inputs).
//!
//! Layout, chosen so that images sharing lower layers share chunks:
//! - fixed geometry whatever the disk size: 4 KiB blocks, groups of
//!   32768 blocks, 8192 inodes a group, every group's bitmaps and inode
//!   table at the start of the group (room kept for the descriptors of up
//!   to 8192 groups), so a bigger disk only adds groups at the end;
//! - inode numbers and data blocks handed out in the tree's node order,
//!   which is layer order: the nodes of the first layer get the same
//!   numbers and blocks whatever layers come above. Nodes that upper
//!   layers delete keep their place (left free), directories get the
//!   blocks their first layer needed there and grow into blocks after
//!   all layers;
//! - files of at least `align` bytes start on a chunk boundary, and every
//!   group's data starts on one, so such a file's chunks hold only its
//!   bytes and are shared with any image holding the same file;
//! - the journal at the end of the disk, zeros but its first block.
//!
//! Features: `has_journal ext_attr dir_index filetype extent sparse_super
//! large_file huge_file dir_nlink extra_isize`; no metadata checksums, no
//! `flex_bg`, no resize inode. Directories are linear (the kernel indexes
//! them as they grow). `e2fsck -fn` passes on what this writes
//! (`engine/tests/oci_import.rs`).

mod emit;
pub mod encode;
mod xattr;

pub use emit::{Disk, Region, Src};

use encode::{Extent, GroupDesc, InodeInfo, SuperInfo};
use xattr::Placement;

use super::tree::{Kind, Node, NodeId, Tree, ROOT};

pub const BLOCK: u64 = 4096;
pub const BLOCKS_PER_GROUP: u64 = 32768;
pub const INODES_PER_GROUP: u32 = 8192;
pub const INODE_SIZE: usize = 256;
const ITABLE_BLOCKS: u64 = INODES_PER_GROUP as u64 * INODE_SIZE as u64 / BLOCK;
/// Descriptor blocks kept in every group with a superblock copy.
const GDT_BLOCKS: u64 = 64;
const DESC_SIZE: u64 = 32;
pub const MAX_GROUPS: u64 = GDT_BLOCKS * BLOCK / DESC_SIZE;
/// Group data starts on a multiple of this many blocks (64 KiB).
const GROUP_DATA_ALIGN: u64 = 16;
const LOST_FOUND_BLOCKS: u64 = 4;
const FAST_SYMLINK_MAX: usize = 59;
/// The smallest disk cairn makes when sizing one itself.
const MIN_HEADROOM: u64 = 256 << 20;

const S_IFIFO: u16 = 0o010000;
const S_IFCHR: u16 = 0o020000;
const S_IFDIR: u16 = 0o040000;
const S_IFBLK: u16 = 0o060000;
const S_IFREG: u16 = 0o100000;
const S_IFLNK: u16 = 0o120000;

#[derive(Debug, Clone)]
pub struct BuildOptions {
    pub uuid: [u8; 16],
    pub hash_seed: [u8; 16],
    /// Seconds: the superblock's times and those of lost+found.
    pub time: u32,
    pub volume_name: [u8; 16],
    /// Files at least this large start on a multiple of it (a chunk).
    pub align: u64,
    /// The disk's size; `None` sizes it to the content plus headroom.
    pub size: Option<u64>,
}

fn has_super(g: u64) -> bool {
    fn power_of(mut g: u64, b: u64) -> bool {
        while g > 1 && g.is_multiple_of(b) {
            g /= b;
        }
        g == 1
    }
    g <= 1 || power_of(g, 3) || power_of(g, 5) || power_of(g, 7)
}

/// First block of group `g`'s bitmaps (block bitmap, inode bitmap, table).
fn bitmap_block(g: u64) -> u64 {
    g * BLOCKS_PER_GROUP + if has_super(g) { 1 + GDT_BLOCKS } else { 0 }
}

/// Blocks at the start of group `g` that hold no data.
fn meta_len(g: u64) -> u64 {
    (bitmap_block(g) - g * BLOCKS_PER_GROUP + 2 + ITABLE_BLOCKS).next_multiple_of(GROUP_DATA_ALIGN)
}

/// Hands out data blocks front to back, around each group's metadata.
struct Alloc {
    next: u64,
}

impl Alloc {
    fn skip_meta(&mut self) {
        let g = self.next / BLOCKS_PER_GROUP;
        self.next = self.next.max(g * BLOCKS_PER_GROUP + meta_len(g));
    }

    fn align(&mut self, blocks: u64) {
        loop {
            self.skip_meta();
            if self.next.is_multiple_of(blocks) {
                return;
            }
            self.next = self.next.next_multiple_of(blocks);
        }
    }

    fn take(&mut self, mut n: u64) -> Vec<Extent> {
        let mut out = Vec::new();
        let mut logical = 0u32;
        while n > 0 {
            self.skip_meta();
            let end = (self.next / BLOCKS_PER_GROUP + 1) * BLOCKS_PER_GROUP;
            let len = n.min(end - self.next).min(encode::MAX_EXTENT_LEN);
            out.push(Extent {
                logical,
                start: self.next,
                len,
            });
            self.next += len;
            logical += len as u32;
            n -= len;
        }
        out
    }

    fn take_blocks(&mut self, n: u64) -> Vec<u64> {
        self.take(n)
            .iter()
            .flat_map(|e| e.start..e.start + e.len)
            .collect()
    }
}

/// The first `n` blocks of `runs`, renumbered.
fn first_blocks(runs: &[Extent], mut n: u64) -> Vec<Extent> {
    let mut out = Vec::new();
    for r in runs {
        if n == 0 {
            break;
        }
        let len = r.len.min(n);
        out.push(Extent { len, ..*r });
        n -= len;
    }
    out
}

fn append_runs(runs: &mut Vec<Extent>, more: Vec<Extent>) {
    let mut logical: u64 = runs.iter().map(|r| r.len).sum();
    for m in more {
        runs.push(Extent {
            logical: logical as u32,
            ..m
        });
        logical += m.len;
    }
}

/// Where a node's data lives on the disk.
#[derive(Default, Clone)]
struct Place {
    runs: Vec<Extent>,
    tree: Vec<u64>,
}

impl Place {
    fn blocks(&self) -> u64 {
        self.runs.iter().map(|r| r.len).sum::<u64>() + self.tree.len() as u64
    }
}

pub fn ino_of(id: NodeId) -> u32 {
    if id == ROOT {
        encode::ROOT_INO
    } else {
        encode::FIRST_INO + id
    }
}

fn live(id: NodeId, n: &Node) -> bool {
    id == ROOT || n.links > 0
}

fn ftype(kind: &Kind) -> u8 {
    match kind {
        Kind::Dir(_) => encode::FT_DIR,
        Kind::File { .. } => encode::FT_REG,
        Kind::Symlink(_) => encode::FT_LNK,
        Kind::Char(..) => encode::FT_CHR,
        Kind::Block(..) => encode::FT_BLK,
        Kind::Fifo => encode::FT_FIFO,
    }
}

/// The entries of a live directory as they go to disk: `.`, `..`, then
/// the live entries in the order they were made.
fn dir_entries(tree: &Tree, id: NodeId, with_lost_found: bool) -> Vec<(Vec<u8>, u32, u8)> {
    let Kind::Dir(d) = &tree.node(id).kind else {
        unreachable!("called for directories")
    };
    let mut v = vec![
        (b".".to_vec(), ino_of(id), encode::FT_DIR),
        (b"..".to_vec(), ino_of(d.parent), encode::FT_DIR),
    ];
    if with_lost_found {
        v.push((
            b"lost+found".to_vec(),
            encode::LOST_FOUND_INO,
            encode::FT_DIR,
        ));
    }
    for e in d.entries.iter().filter(|e| e.live()) {
        v.push((
            e.name.clone(),
            ino_of(e.node),
            ftype(&tree.node(e.node).kind),
        ));
    }
    v
}

/// Blocks a directory is given in its first layer: what its entries then
/// needed.
fn reserved_dir_blocks(tree: &Tree, id: NodeId) -> u64 {
    let node = tree.node(id);
    let Kind::Dir(d) = &node.kind else {
        return 0;
    };
    let alive_then = d.entries[..d.first_layer_len]
        .iter()
        .filter(|e| e.removed_in.is_none_or(|r| r > node.layer));
    let extra = if id == ROOT { 10 } else { 0 }; // lost+found
    let lens = [1usize, 2, extra]
        .into_iter()
        .filter(|&n| n > 0)
        .chain(alive_then.map(|e| e.name.len()));
    encode::dir_blocks(lens).max(1)
}

/// Lays the tree out and encodes the file system.
pub fn build(tree: &Tree, opts: &BuildOptions) -> Result<Disk, String> {
    let align_blocks = (opts.align / BLOCK).max(1);
    let mut alloc = Alloc { next: 0 };
    let lost_found_runs = alloc.take(LOST_FOUND_BLOCKS);
    let with_lost_found = tree.lookup(ROOT, b"lost+found").is_none();

    // Layer order: every node, dead or alive, keeps its place.
    let mut place: Vec<Place> = vec![Place::default(); tree.nodes.len()];
    for (i, node) in tree.nodes.iter().enumerate() {
        let p = &mut place[i];
        match &node.kind {
            Kind::Dir(_) => p.runs = alloc.take(reserved_dir_blocks(tree, i as NodeId)),
            Kind::File { len, .. } if *len > 0 => {
                if *len >= opts.align {
                    alloc.align(align_blocks);
                }
                p.runs = alloc.take(len.div_ceil(BLOCK));
                p.tree = alloc.take_blocks(encode::extent_tree_blocks(p.runs.len()) as u64);
            }
            Kind::Symlink(t) if t.len() > FAST_SYMLINK_MAX => p.runs = alloc.take(1),
            _ => {}
        }
    }

    // After all layers: directories that grew, their tree blocks, and
    // attribute blocks.
    let mut dir_blocks: Vec<(NodeId, Vec<Vec<u8>>)> = Vec::new();
    let mut xattrs: Vec<Placement> = Vec::with_capacity(tree.nodes.len());
    let mut xattr_blocks: Vec<u64> = vec![0; tree.nodes.len()];
    for (i, node) in tree.nodes.iter().enumerate() {
        let id = i as NodeId;
        if !live(id, node) {
            xattrs.push(Placement::None);
            continue;
        }
        if node.is_dir() {
            let mut blocks = Vec::new();
            let entries = dir_entries(tree, id, id == ROOT && with_lost_found);
            encode::pack_dir(
                entries.iter().map(|(n, ino, ft)| (n.as_slice(), *ino, *ft)),
                |b| blocks.push(b),
            );
            let need = blocks.len() as u64;
            let p = &mut place[i];
            let have: u64 = p.runs.iter().map(|r| r.len).sum();
            p.runs = first_blocks(&p.runs, need);
            if need > have {
                append_runs(&mut p.runs, alloc.take(need - have));
            }
            p.tree = alloc.take_blocks(encode::extent_tree_blocks(p.runs.len()) as u64);
            dir_blocks.push((id, blocks));
        }
        let attrs = node
            .meta
            .xattrs
            .iter()
            .map(|(k, v)| xattr::to_attr(k, v))
            .collect::<Result<Vec<_>, _>>()?;
        let placed = xattr::place(attrs)?;
        if matches!(placed, Placement::Block(_)) {
            xattr_blocks[i] = alloc.take_blocks(1)[0];
        }
        xattrs.push(placed);
    }
    let content_end = alloc.next;

    // Size, inodes, journal.
    let max_ino = u64::from(ino_of(tree.nodes.len() as NodeId - 1).max(encode::FIRST_INO));
    let (fs_blocks, disk_bytes) = size_fs(content_end, max_ino, opts.size)?;
    let groups = fs_blocks.div_ceil(BLOCKS_PER_GROUP);
    let journal_len = journal_blocks(fs_blocks);
    let journal = journal_runs(fs_blocks, journal_len);
    if journal.first().is_none_or(|r| r.start < content_end) {
        return Err(format!(
            "{disk_bytes} bytes are too small for this image: its content and journal need more than {} bytes; leave --disk-size out or give more",
            (content_end + journal_len) * BLOCK
        ));
    }

    // Which blocks are used.
    let mut used = Bitset::new(fs_blocks);
    let gdt_used = (groups * DESC_SIZE).div_ceil(BLOCK);
    for g in 0..groups {
        let start = g * BLOCKS_PER_GROUP;
        if has_super(g) {
            used.set_range(start, 1 + gdt_used);
        }
        used.set_range(bitmap_block(g), 2 + ITABLE_BLOCKS);
    }
    let mark = |used: &mut Bitset, p: &Place| {
        for r in &p.runs {
            used.set_range(r.start, r.len);
        }
        for &b in &p.tree {
            used.set(b);
        }
    };
    for (i, node) in tree.nodes.iter().enumerate() {
        if live(i as NodeId, node) {
            mark(&mut used, &place[i]);
            if xattr_blocks[i] != 0 {
                used.set(xattr_blocks[i]);
            }
        }
    }
    if with_lost_found {
        for r in &lost_found_runs {
            used.set_range(r.start, r.len);
        }
    }
    for r in &journal {
        used.set_range(r.start, r.len);
    }

    let mut regions: Vec<Region> = Vec::new();
    let mut itables = Itables::default();
    let mut dirs_per_group = vec![0u32; groups as usize];
    let mut used_inodes = Bitset::new(groups * u64::from(INODES_PER_GROUP) + 1);
    for ino in 1..=encode::FIRST_INO as u64 {
        used_inodes.set(ino);
    }

    // Journal inode.
    let mut jblock = [0u8; 60];
    let jtree = alloc_tree_inline(&journal, &mut jblock)?;
    let jsize = journal_len * BLOCK;
    itables.put(
        u64::from(encode::JOURNAL_INO),
        &InodeInfo {
            mode: S_IFREG | 0o600,
            uid: 0,
            gid: 0,
            size: jsize,
            links: 1,
            sectors: journal_len * 8,
            flags: encode::EXTENTS_FL,
            mtime: (i64::from(opts.time), 0),
            i_block: &jblock,
            xattr_block: 0,
            ibody_xattrs: &[],
        },
    );
    debug_assert!(jtree.is_empty());
    regions.push(Region {
        block: journal[0].start,
        src: Src::Bytes(encode::journal_superblock(journal_len as u32, &opts.uuid)),
    });
    let mut journal_backup = [0u32; 17];
    for (i, w) in jblock.chunks_exact(4).enumerate() {
        journal_backup[i] = u32::from_le_bytes(w.try_into().expect("4 bytes"));
    }
    journal_backup[15] = (jsize >> 32) as u32;
    journal_backup[16] = jsize as u32;

    // lost+found.
    if with_lost_found {
        let mut b = [0u8; 60];
        encode::extent_tree(&lost_found_runs, &[], &mut b)?;
        itables.put(
            u64::from(encode::LOST_FOUND_INO),
            &InodeInfo {
                mode: S_IFDIR | 0o700,
                uid: 0,
                gid: 0,
                size: LOST_FOUND_BLOCKS * BLOCK,
                links: 2,
                sectors: LOST_FOUND_BLOCKS * 8,
                flags: encode::EXTENTS_FL,
                mtime: (i64::from(opts.time), 0),
                i_block: &b,
                xattr_block: 0,
                ibody_xattrs: &[],
            },
        );
        let mut first = Vec::new();
        encode::pack_dir(
            [
                (&b"."[..], encode::LOST_FOUND_INO, encode::FT_DIR),
                (&b".."[..], encode::ROOT_INO, encode::FT_DIR),
            ]
            .into_iter(),
            |b| first = b,
        );
        let mut bytes = first;
        for _ in 1..LOST_FOUND_BLOCKS {
            bytes.extend_from_slice(&encode::empty_dir_block());
        }
        regions.push(Region {
            block: lost_found_runs[0].start,
            src: Src::Bytes(bytes),
        });
        dirs_per_group[0] += 1;
    }

    // Directory blocks.
    let mut subdirs = vec![0u32; tree.nodes.len()];
    for (i, node) in tree.nodes.iter().enumerate() {
        if i as NodeId != ROOT && live(i as NodeId, node) && node.is_dir() {
            if let Kind::Dir(d) = &node.kind {
                subdirs[d.parent as usize] += 1;
            }
        }
    }
    if with_lost_found {
        subdirs[ROOT as usize] += 1;
    }
    for (id, blocks) in dir_blocks {
        let p = &place[id as usize];
        let mut k = 0;
        for r in &p.runs {
            let mut bytes = Vec::with_capacity((r.len * BLOCK) as usize);
            for b in &blocks[k..k + r.len as usize] {
                bytes.extend_from_slice(b);
            }
            k += r.len as usize;
            regions.push(Region {
                block: r.start,
                src: Src::Bytes(bytes),
            });
        }
    }

    // Inodes and file data.
    for (i, node) in tree.nodes.iter().enumerate() {
        let id = i as NodeId;
        if !live(id, node) {
            continue;
        }
        let ino = u64::from(ino_of(id));
        used_inodes.set(ino);
        let p = &place[i];
        let mut i_block = [0u8; 60];
        let mut flags = 0;
        let mut size = 0u64;
        let kind_bits = match &node.kind {
            Kind::Dir(_) => {
                dirs_per_group[((ino - 1) / u64::from(INODES_PER_GROUP)) as usize] += 1;
                size = p.runs.iter().map(|r| r.len).sum::<u64>() * BLOCK;
                S_IFDIR
            }
            Kind::File { offset, len } => {
                size = *len;
                if let Some(r) = p.runs.first() {
                    regions.push(Region {
                        block: r.start,
                        src: Src::Spool {
                            offset: *offset,
                            len: (r.len * BLOCK).min(*len),
                        },
                    });
                    let mut off = r.len * BLOCK;
                    for r in &p.runs[1..] {
                        regions.push(Region {
                            block: r.start,
                            src: Src::Spool {
                                offset: offset + off,
                                len: (r.len * BLOCK).min(len - off),
                            },
                        });
                        off += r.len * BLOCK;
                    }
                }
                S_IFREG
            }
            Kind::Symlink(t) => {
                size = t.len() as u64;
                if t.len() <= FAST_SYMLINK_MAX {
                    i_block[..t.len()].copy_from_slice(t);
                } else {
                    let mut b = t.clone();
                    b.resize(BLOCK as usize, 0);
                    regions.push(Region {
                        block: p.runs[0].start,
                        src: Src::Bytes(b),
                    });
                }
                S_IFLNK
            }
            Kind::Char(ma, mi) => {
                i_block = encode::device_block(*ma, *mi);
                S_IFCHR
            }
            Kind::Block(ma, mi) => {
                i_block = encode::device_block(*ma, *mi);
                S_IFBLK
            }
            Kind::Fifo => S_IFIFO,
        };
        if !p.runs.is_empty() || matches!(node.kind, Kind::Dir(_) | Kind::File { .. }) {
            flags = encode::EXTENTS_FL;
            for (blk, bytes) in encode::extent_tree(&p.runs, &p.tree, &mut i_block)? {
                regions.push(Region {
                    block: blk,
                    src: Src::Bytes(bytes),
                });
            }
        }
        let links = match &node.kind {
            Kind::Dir(_) => {
                let n = 2 + subdirs[i];
                if n >= 65000 {
                    1
                } else {
                    n as u16
                }
            }
            _ => node.links.min(65000) as u16,
        };
        let mut sectors = p.blocks() * 8;
        let ibody: &[u8] = match &xattrs[i] {
            Placement::None => &[],
            Placement::Inode(b) => b,
            Placement::Block(b) => {
                sectors += 8;
                regions.push(Region {
                    block: xattr_blocks[i],
                    src: Src::Bytes(b.clone()),
                });
                &[]
            }
        };
        itables.put(
            ino,
            &InodeInfo {
                mode: kind_bits | (node.meta.mode & 0o7777),
                uid: node.meta.uid,
                gid: node.meta.gid,
                size,
                links,
                sectors,
                flags,
                mtime: (node.meta.mtime.sec, node.meta.mtime.nsec),
                i_block: &i_block,
                xattr_block: xattr_blocks[i],
                ibody_xattrs: ibody,
            },
        );
    }

    // Group descriptors, bitmaps, superblocks.
    let mut gdt = vec![0u8; (gdt_used * BLOCK) as usize];
    let mut free_blocks_total = 0u64;
    let mut free_inodes_total = 0u64;
    for g in 0..groups {
        let start = g * BLOCKS_PER_GROUP;
        let count = (fs_blocks - start).min(BLOCKS_PER_GROUP);
        let mut bb = vec![0u8; BLOCK as usize];
        let mut free_b = 0u64;
        for b in 0..BLOCKS_PER_GROUP {
            if b >= count || used.get(start + b) {
                bb[(b / 8) as usize] |= 1 << (b % 8);
            } else {
                free_b += 1;
            }
        }
        let mut ib = vec![0xFFu8; BLOCK as usize];
        ib[..(INODES_PER_GROUP / 8) as usize].fill(0);
        let mut free_i = 0u64;
        for k in 0..u64::from(INODES_PER_GROUP) {
            let ino = g * u64::from(INODES_PER_GROUP) + k + 1;
            if used_inodes.get(ino) {
                ib[(k / 8) as usize] |= 1 << (k % 8);
            } else {
                free_i += 1;
            }
        }
        free_blocks_total += free_b;
        free_inodes_total += free_i;
        bb.extend_from_slice(&ib);
        let bitmaps = bitmap_block(g);
        regions.push(Region {
            block: bitmaps,
            src: Src::Bytes(bb),
        });
        encode::group_desc(
            &GroupDesc {
                block_bitmap: bitmaps as u32,
                inode_bitmap: bitmaps as u32 + 1,
                inode_table: bitmaps as u32 + 2,
                free_blocks: free_b as u16,
                free_inodes: free_i as u16,
                dirs: dirs_per_group[g as usize] as u16,
            },
            &mut gdt[(g * DESC_SIZE) as usize..((g + 1) * DESC_SIZE) as usize],
        );
        if let Some(table) = itables.take(g) {
            regions.push(Region {
                block: bitmaps + 2,
                src: Src::Bytes(table),
            });
        }
    }
    let info = SuperInfo {
        blocks: fs_blocks,
        groups: groups as u32,
        free_blocks: free_blocks_total,
        free_inodes: free_inodes_total,
        uuid: opts.uuid,
        hash_seed: opts.hash_seed,
        time: opts.time,
        volume_name: opts.volume_name,
        journal_backup,
    };
    for g in (0..groups).filter(|&g| has_super(g)) {
        let sb = encode::superblock(&info, g as u32);
        let mut first = vec![0u8; BLOCK as usize];
        let at = if g == 0 { 1024 } else { 0 };
        first[at..at + 1024].copy_from_slice(&sb);
        first.extend_from_slice(&gdt);
        regions.push(Region {
            block: g * BLOCKS_PER_GROUP,
            src: Src::Bytes(first),
        });
    }
    regions.sort_by_key(|r| r.block);
    Ok(Disk {
        size: disk_bytes,
        regions,
        used_blocks: fs_blocks - free_blocks_total,
        inodes: (groups * u64::from(INODES_PER_GROUP)) - free_inodes_total,
    })
}

fn alloc_tree_inline(
    runs: &[Extent],
    i_block: &mut [u8; 60],
) -> Result<Vec<(u64, Vec<u8>)>, String> {
    if runs.len() > encode::INODE_EXTENTS {
        return Err("the journal is too fragmented".into());
    }
    encode::extent_tree(runs, &[], i_block)
}

/// Journal size by file system size, as mke2fs picks it.
fn journal_blocks(fs_blocks: u64) -> u64 {
    let bytes = fs_blocks * BLOCK;
    let j = if bytes < (1 << 30) {
        16 << 20
    } else if bytes < (4 << 30) {
        32 << 20
    } else if bytes < (16 << 30) {
        64 << 20
    } else {
        128 << 20
    };
    j / BLOCK
}

/// The journal's runs: the last `n` data blocks of the file system.
fn journal_runs(fs_blocks: u64, n: u64) -> Vec<Extent> {
    let mut runs = Vec::new();
    let mut left = n;
    let mut end = fs_blocks;
    while left > 0 && end > 0 {
        let g = (end - 1) / BLOCKS_PER_GROUP;
        let data_start = g * BLOCKS_PER_GROUP + meta_len(g);
        if end <= data_start {
            end = g * BLOCKS_PER_GROUP;
            continue;
        }
        let len = left.min(end - data_start);
        runs.push((end - len, len));
        left -= len;
        end = g * BLOCKS_PER_GROUP;
    }
    if left > 0 {
        return Vec::new();
    }
    let mut logical = 0u32;
    runs.iter()
        .rev()
        .map(|&(start, len)| {
            let e = Extent {
                logical,
                start,
                len,
            };
            logical += len as u32;
            e
        })
        .collect()
}

/// The file system's blocks and the disk's bytes.
fn size_fs(content_end: u64, max_ino: u64, size: Option<u64>) -> Result<(u64, u64), String> {
    let groups_for_inodes = max_ino.div_ceil(u64::from(INODES_PER_GROUP));
    let (mut blocks, disk) = match size {
        Some(bytes) => {
            let blocks = bytes / BLOCK;
            if blocks.div_ceil(BLOCKS_PER_GROUP) < groups_for_inodes {
                return Err(format!(
                    "--disk-size {bytes} leaves room for {} inodes; this image has {max_ino} files: give at least {} bytes",
                    blocks.div_ceil(BLOCKS_PER_GROUP) * u64::from(INODES_PER_GROUP),
                    groups_for_inodes * BLOCKS_PER_GROUP * BLOCK
                ));
            }
            (blocks, bytes)
        }
        None => {
            let headroom = (content_end / 2).max(MIN_HEADROOM / BLOCK);
            let mut blocks = content_end + headroom;
            blocks += journal_blocks(blocks);
            // Inodes to spare too: a quarter more than the image has.
            let groups = (max_ino + max_ino / 4)
                .div_ceil(u64::from(INODES_PER_GROUP))
                .max(blocks.div_ceil(BLOCKS_PER_GROUP));
            blocks = blocks.max((groups - 1) * BLOCKS_PER_GROUP + 1);
            blocks = blocks.next_multiple_of(256); // whole MiB
            (blocks, 0)
        }
    };
    // A last group too small for its own metadata is left out.
    let last = (blocks - 1) / BLOCKS_PER_GROUP;
    let last_len = blocks - last * BLOCKS_PER_GROUP;
    if last_len < meta_len(last) + 256 {
        if size.is_some() {
            blocks = last * BLOCKS_PER_GROUP;
        } else {
            blocks = last * BLOCKS_PER_GROUP + meta_len(last) + 256;
        }
    }
    if blocks == 0 || blocks.div_ceil(BLOCKS_PER_GROUP) > MAX_GROUPS {
        return Err(format!(
            "a disk of {} bytes is outside what cairn builds (up to {} GiB)",
            blocks * BLOCK,
            (MAX_GROUPS * BLOCKS_PER_GROUP * BLOCK) >> 30
        ));
    }
    let disk = if size.is_some() { disk } else { blocks * BLOCK };
    Ok((blocks, disk))
}

/// One bit per block (or inode).
struct Bitset(Vec<u64>);

impl Bitset {
    fn new(n: u64) -> Bitset {
        Bitset(vec![0; n.div_ceil(64) as usize])
    }
    fn set(&mut self, i: u64) {
        self.0[(i / 64) as usize] |= 1 << (i % 64);
    }
    fn set_range(&mut self, start: u64, len: u64) {
        for i in start..start + len {
            self.set(i);
        }
    }
    fn get(&self, i: u64) -> bool {
        self.0
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }
}

/// Inode tables, per group, up to the last inode used in each.
#[derive(Default)]
struct Itables(std::collections::BTreeMap<u64, Vec<u8>>);

impl Itables {
    fn put(&mut self, ino: u64, info: &InodeInfo) {
        let per = u64::from(INODES_PER_GROUP);
        let (g, k) = ((ino - 1) / per, ((ino - 1) % per) as usize);
        let t = self.0.entry(g).or_default();
        let need = ((k + 1) * INODE_SIZE).next_multiple_of(BLOCK as usize);
        if t.len() < need {
            t.resize(need, 0);
        }
        encode::inode(info, &mut t[k * INODE_SIZE..(k + 1) * INODE_SIZE]);
    }

    fn take(&mut self, g: u64) -> Option<Vec<u8>> {
        self.0.remove(&g)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_data_starts_aligned_and_sizes_are_stable() {
        for g in 0..30 {
            assert_eq!((g * BLOCKS_PER_GROUP + meta_len(g)) % GROUP_DATA_ALIGN, 0);
        }
        assert!(has_super(0) && has_super(1) && has_super(9) && has_super(25) && has_super(49));
        assert!(!has_super(2) && !has_super(6) && !has_super(10));
        let mut a = Alloc { next: 0 };
        let runs = a.take(BLOCKS_PER_GROUP);
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].start, meta_len(0));
        assert_eq!(runs[1].start, BLOCKS_PER_GROUP + meta_len(1));
        let (blocks, bytes) = size_fs(1000, 100, None).unwrap();
        assert_eq!(blocks * BLOCK, bytes);
        assert!(size_fs(1000, 100_000, Some(128 << 20)).is_err());
    }

    #[test]
    fn journal_sits_at_the_end() {
        let runs = journal_runs(3 * BLOCKS_PER_GROUP, 4096);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].start + runs[0].len, 3 * BLOCKS_PER_GROUP);
    }
}
