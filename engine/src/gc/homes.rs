//! The mark's join, in bounded memory: the live chunk ids (from every
//! root manifest) and every pack's index entries are sorted on disk
//! ([`super::spill`]), then read side by side, in a few passes, to give
//! each live chunk one home and each pack what the planner needs: the
//! frame bytes homed in it and, for a sparse one, the entries to copy.
//! What stays in memory is per pack, never per chunk.
//!
//! A live chunk's home, of the packs holding it: one not condemned, then
//! the one with the most live bytes, then the lowest id.

use std::io;
use std::path::Path;

use super::spill::{self, Sorted, Spill};
use crate::id::{ChunkId, PackId};
use crate::pack::{IndexEntry, PackIndex, PACK_HEADER_LEN};

/// One index entry and its pack's number: id, pack, offset, frame
/// length, raw length (big-endian, so records sort by chunk id).
const ENTRY_LEN: usize = 32 + 4 + 8 + 4 + 4;

/// A pack as the planner needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackFacts {
    pub id: PackId,
    /// The size of the pack object.
    pub bytes: u64,
    /// Its frame bytes (header and index excluded).
    pub frames: u64,
    /// Live chunks homed here, and their frame bytes.
    pub homed: u64,
    pub kept: u64,
    /// The homed entries, for a sparse pack only (to be copied).
    pub keep: Vec<IndexEntry>,
}

/// Whether a pack with `kept` of its `frames` bytes live is rewritten.
pub fn is_sparse(kept: u64, frames: u64, rewrite_below: f64) -> bool {
    (kept as f64) < rewrite_below * frames as f64
}

/// The join's outcome.
#[derive(Debug)]
pub struct Homes {
    pub packs: Vec<PackFacts>,
    /// Distinct live chunks, and those no pack holds.
    pub live_chunks: u64,
    pub missing_chunks: u64,
}

/// A mark being gathered: live chunk ids and pack indexes go to disk.
pub struct Mark {
    live: Spill<32>,
    entries: Spill<ENTRY_LEN>,
    packs: Vec<PackFacts>,
}

impl Mark {
    /// A mark spilling into `dir` (which must exist).
    pub fn new(dir: &Path) -> Mark {
        Mark::with_buffer(dir, spill::BUFFER_BYTES)
    }

    /// As [`Mark::new`], each spill buffering at most `bytes`.
    pub fn with_buffer(dir: &Path, bytes: usize) -> Mark {
        Mark {
            live: Spill::with_buffer(dir, "live", bytes),
            entries: Spill::with_buffer(dir, "entries", bytes),
            packs: Vec::new(),
        }
    }

    pub fn live(&mut self, id: &ChunkId) -> io::Result<()> {
        self.live.push(*id.as_bytes())
    }

    pub fn pack(&mut self, index: &PackIndex) -> io::Result<()> {
        let n = u32::try_from(self.packs.len()).map_err(io::Error::other)?;
        for e in &index.entries {
            self.entries.push(encode(n, e))?;
        }
        self.packs.push(PackFacts {
            id: index.id,
            bytes: super::plan::pack_bytes(index),
            frames: index.index_offset().saturating_sub(PACK_HEADER_LEN),
            homed: 0,
            kept: 0,
            keep: Vec::new(),
        });
        Ok(())
    }

    /// Joins the two: each live chunk's home. `condemned` says whether a
    /// pack is condemned; `rewrite_below` which packs are sparse.
    pub fn homes(
        self,
        condemned: impl Fn(&PackId) -> bool,
        rewrite_below: f64,
    ) -> io::Result<Homes> {
        let live = self.live.finish()?;
        let entries = self.entries.finish()?;
        let mut packs = self.packs;
        let condemned: Vec<bool> = packs.iter().map(|p| condemned(&p.id)).collect();

        // Pass 1: each pack's live bytes (every copy counts).
        let mut live_bytes = vec![0u64; packs.len()];
        let missing_chunks = join(&live, &entries, |group| {
            for (n, e) in group {
                live_bytes[*n as usize] += u64::from(e.frame_len);
            }
        })?;
        let rank = |n: u32| {
            let n = n as usize;
            (!condemned[n], live_bytes[n], std::cmp::Reverse(packs[n].id))
        };
        let home = |group: &[(u32, IndexEntry)]| -> (u32, IndexEntry) {
            let mut best = group[0];
            for &(n, e) in &group[1..] {
                if rank(n) > rank(best.0) {
                    best = (n, e);
                }
            }
            best
        };

        // Pass 2: homes, counted per pack.
        let mut homed = vec![(0u64, 0u64); packs.len()];
        join(&live, &entries, |group| {
            let (n, e) = home(group);
            let h = &mut homed[n as usize];
            h.0 += 1;
            h.1 += u64::from(e.frame_len);
        })?;
        let sparse: Vec<bool> = packs
            .iter()
            .zip(&homed)
            .zip(&condemned)
            .map(|((p, h), &c)| !c && h.0 > 0 && is_sparse(h.1, p.frames, rewrite_below))
            .collect();

        // Pass 3, if any pack is sparse: the entries to copy.
        let mut keep: Vec<Vec<IndexEntry>> = vec![Vec::new(); packs.len()];
        if sparse.iter().any(|&s| s) {
            join(&live, &entries, |group| {
                let (n, e) = home(group);
                if sparse[n as usize] {
                    keep[n as usize].push(e);
                }
            })?;
        }
        for ((p, (count, bytes)), k) in packs.iter_mut().zip(homed).zip(keep) {
            p.homed = count;
            p.kept = bytes;
            p.keep = k;
        }
        Ok(Homes {
            packs,
            live_chunks: live.len(),
            missing_chunks,
        })
    }
}

fn encode(pack: u32, e: &IndexEntry) -> [u8; ENTRY_LEN] {
    let mut r = [0u8; ENTRY_LEN];
    r[..32].copy_from_slice(e.id.as_bytes());
    r[32..36].copy_from_slice(&pack.to_be_bytes());
    r[36..44].copy_from_slice(&e.offset.to_be_bytes());
    r[44..48].copy_from_slice(&e.frame_len.to_be_bytes());
    r[48..52].copy_from_slice(&e.raw_len.to_be_bytes());
    r
}

fn decode(r: &[u8; ENTRY_LEN]) -> (u32, IndexEntry) {
    let u32_at = |at: usize| u32::from_be_bytes(r[at..at + 4].try_into().expect("4 bytes"));
    let id: [u8; 32] = r[..32].try_into().expect("32 bytes");
    (
        u32_at(32),
        IndexEntry {
            id: ChunkId::from_bytes(id),
            offset: u64::from_be_bytes(r[36..44].try_into().expect("8 bytes")),
            frame_len: u32_at(44),
            raw_len: u32_at(48),
        },
    )
}

/// Reads the live ids and the entries side by side and calls `f` with
/// the entries of each live chunk that some pack holds; returns how many
/// live chunks none holds.
fn join(
    live: &Sorted<32>,
    entries: &Sorted<ENTRY_LEN>,
    mut f: impl FnMut(&[(u32, IndexEntry)]),
) -> io::Result<u64> {
    let mut missing = 0;
    let mut group = Vec::new();
    spill::join(live, entries, |_, held| {
        if held.is_empty() {
            missing += 1;
            return;
        }
        group.clear();
        group.extend(held.iter().map(decode));
        f(&group);
    })?;
    Ok(missing)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::{HashMap, HashSet};

    /// Homes and counts computed in memory, the way the mark did before it
    /// streamed: the reference the join must match.
    fn in_memory(packs: &[PackIndex], live: &HashSet<ChunkId>) -> (Vec<(u64, u64)>, u64) {
        let live_bytes: Vec<u64> = packs
            .iter()
            .map(|p| {
                p.entries
                    .iter()
                    .filter(|e| live.contains(&e.id))
                    .map(|e| u64::from(e.frame_len))
                    .sum()
            })
            .collect();
        let rank = |i: usize| (live_bytes[i], std::cmp::Reverse(packs[i].id));
        let mut homes: HashMap<ChunkId, (usize, IndexEntry)> = HashMap::new();
        for (i, p) in packs.iter().enumerate() {
            for e in p.entries.iter().filter(|e| live.contains(&e.id)) {
                homes
                    .entry(e.id)
                    .and_modify(|h| {
                        if rank(i) > rank(h.0) {
                            *h = (i, *e);
                        }
                    })
                    .or_insert((i, *e));
            }
        }
        let mut per_pack = vec![(0, 0); packs.len()];
        for (i, e) in homes.values() {
            per_pack[*i].0 += 1;
            per_pack[*i].1 += u64::from(e.frame_len);
        }
        let missing = live.iter().filter(|c| !homes.contains_key(c)).count() as u64;
        (per_pack, missing)
    }

    #[test]
    fn the_join_over_many_spilled_runs_finds_the_homes_the_in_memory_mark_did() {
        let mut rng = fastrand::Rng::with_seed(15);
        let chunk = |n: u32| ChunkId::of(&n.to_le_bytes());
        // 6 packs of 300 entries drawn from 1,000 chunks (so many are in
        // several packs), frames of varied sizes.
        let packs: Vec<PackIndex> = (0..6)
            .map(|_| {
                let mut offset = PACK_HEADER_LEN;
                let entries = (0..300)
                    .map(|_| {
                        let frame_len = rng.u32(100..5000);
                        let e = IndexEntry {
                            id: chunk(rng.u32(..1000)),
                            offset,
                            frame_len,
                            raw_len: 4096,
                        };
                        offset += u64::from(frame_len);
                        e
                    })
                    .collect();
                PackIndex::from_entries(entries)
            })
            .collect();
        // 600 live chunks, 100 of them in no pack.
        let live: HashSet<ChunkId> = (0..500)
            .map(|_| chunk(rng.u32(..1000)))
            .chain((0..100).map(|n| chunk(5000 + n)))
            .collect();
        let dir = tempfile::tempdir().unwrap();
        // Buffers of 64 records: dozens of runs each.
        let mut mark = Mark::with_buffer(dir.path(), 64 * ENTRY_LEN);
        for id in &live {
            mark.live(id).unwrap();
            mark.live(id).unwrap(); // twice: counted once
        }
        for p in &packs {
            mark.pack(p).unwrap();
        }
        let homes = mark.homes(|_| false, 0.5).unwrap();
        let (want, missing) = in_memory(&packs, &live);
        let got: Vec<(u64, u64)> = homes.packs.iter().map(|p| (p.homed, p.kept)).collect();
        assert_eq!(got, want);
        assert_eq!(homes.missing_chunks, missing);
        assert_eq!(homes.live_chunks, live.len() as u64);
        // A sparse pack carries exactly its homed entries.
        for p in &homes.packs {
            if is_sparse(p.kept, p.frames, 0.5) && p.homed > 0 {
                assert_eq!(p.keep.len() as u64, p.homed);
                assert_eq!(
                    p.keep.iter().map(|e| u64::from(e.frame_len)).sum::<u64>(),
                    p.kept
                );
            } else {
                assert!(p.keep.is_empty());
            }
        }
    }
}
