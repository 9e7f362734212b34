//! What a run does, decided from the mark: pure, so every rule is tested
//! without a store.
//!
//! Each live chunk gets one home: of the packs holding it, one not
//! condemned, then the one with the most live bytes, then the lowest id.
//! A pack that is nobody's home is dead. A pack whose homed frames are
//! less than `rewrite_below` of its frame bytes is sparse: those frames
//! are copied into new packs and it is condemned. A condemned object is
//! deleted once it was condemned at least the grace period before this
//! run's mark began and is still dead; one that is live again is taken
//! off the list.

use std::collections::{HashMap, HashSet};

use super::state::{Condemned, GcState};
use crate::id::{ChunkId, PackId};
use crate::layout;
use crate::pack::{IndexEntry, PackIndex, FOOTER_LEN, INDEX_ENTRY_LEN};

/// The size of the pack object an index describes.
pub fn pack_bytes(index: &PackIndex) -> u64 {
    index.index_offset() + (index.entries.len() * INDEX_ENTRY_LEN + FOOTER_LEN) as u64
}

/// What the mark found, as the planner needs it.
pub struct Marked<'a> {
    pub packs: &'a [PackIndex],
    pub live: &'a HashSet<ChunkId>,
    /// Objects other than packs that nothing references, with their sizes
    /// where known (`.pack` objects with no index, manifests, working
    /// sets, VM states).
    pub dead_objects: Vec<(String, u64)>,
}

#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// When this run's mark began (Unix ms).
    pub mark_ms: u64,
    pub grace_ms: u64,
    /// A pack whose live frames are less than this share of its frame
    /// bytes is rewritten (0 turns rewriting off).
    pub rewrite_below: f64,
}

/// A sparse pack's live frames, to be copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub pack: PackId,
    pub bytes: u64,
    pub keep: Vec<IndexEntry>,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    pub delete: Vec<(String, Condemned)>,
    pub uncondemn: Vec<String>,
    /// Newly dead: key and size.
    pub condemn: Vec<(String, u64)>,
    pub rewrite: Vec<Rewrite>,
    /// Condemned, still dead, still within the grace period.
    pub waiting: u64,
    pub waiting_bytes: u64,
    /// Live chunks that no pack holds (`cairn verify` says more).
    pub missing_chunks: u64,
    pub live_bytes: u64,
    pub pack_bytes: u64,
}

pub fn plan(marked: &Marked, state: &GcState, rules: &Rules) -> Plan {
    let mut plan = Plan::default();
    let condemned = |p: &PackId| {
        let k = layout::pack_key(p);
        state.condemned.contains_key(&k) || state.deleting.contains_key(&k)
    };
    // Live frame bytes of each pack, before homes are chosen.
    let live_bytes: Vec<u64> = marked
        .packs
        .iter()
        .map(|p| {
            p.entries
                .iter()
                .filter(|e| marked.live.contains(&e.id))
                .map(|e| u64::from(e.frame_len))
                .sum()
        })
        .collect();
    // Each live chunk's home: (pack number, entry).
    let mut homes: HashMap<ChunkId, (usize, IndexEntry)> = HashMap::new();
    let rank = |i: usize| (!condemned(&marked.packs[i].id), live_bytes[i], std::cmp::Reverse(marked.packs[i].id));
    for (i, p) in marked.packs.iter().enumerate() {
        for e in p.entries.iter().filter(|e| marked.live.contains(&e.id)) {
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
    plan.missing_chunks = marked
        .live
        .iter()
        .filter(|c| !homes.contains_key(c))
        .count() as u64;
    let mut homed: Vec<Vec<IndexEntry>> = vec![Vec::new(); marked.packs.len()];
    for (i, e) in homes.into_values() {
        homed[i].push(e);
    }
    for (i, p) in marked.packs.iter().enumerate() {
        let key = layout::pack_key(&p.id);
        let bytes = pack_bytes(p);
        plan.pack_bytes += bytes;
        let keep = std::mem::take(&mut homed[i]);
        let kept: u64 = keep.iter().map(|e| u64::from(e.frame_len)).sum();
        plan.live_bytes += kept;
        let frames = p.index_offset().saturating_sub(crate::pack::PACK_HEADER_LEN);
        if keep.is_empty() {
            decide_dead(&mut plan, state, rules, key, bytes);
            continue;
        }
        if state.condemned.contains_key(&key) || state.deleting.contains_key(&key) {
            plan.uncondemn.push(key);
        } else if !state.deleting.contains_key(&key)
            && (kept as f64) < rules.rewrite_below * frames as f64
        {
            plan.rewrite.push(Rewrite {
                pack: p.id,
                bytes,
                keep,
            });
        }
    }
    let dead: HashSet<&str> = marked.dead_objects.iter().map(|(k, _)| k.as_str()).collect();
    for (key, bytes) in &marked.dead_objects {
        decide_dead(&mut plan, state, rules, key.clone(), *bytes);
    }
    // Condemned objects that are not packs and are live again.
    let packs: HashSet<String> = marked.packs.iter().map(|p| layout::pack_key(&p.id)).collect();
    for key in state.condemned.keys().chain(state.deleting.keys()) {
        if !packs.contains(key) && !dead.contains(key.as_str()) {
            plan.uncondemn.push(key.clone());
        }
    }
    plan
}

fn decide_dead(plan: &mut Plan, state: &GcState, rules: &Rules, key: String, bytes: u64) {
    if let Some(c) = state.deleting.get(&key) {
        // A run that died while deleting it: finish the job.
        plan.delete.push((key, *c));
    } else if let Some(c) = state.condemned.get(&key) {
        if c.at_ms + rules.grace_ms <= rules.mark_ms {
            plan.delete.push((key, *c));
        } else {
            plan.waiting += 1;
            plan.waiting_bytes += c.bytes;
        }
    } else {
        plan.condemn.push((key, bytes));
    }
}
