//! One process's index of the cached chunks it knows: a slot per chunk
//! with its size and mapping, queued least recently used first.
//!
//! Lazy LRU: a use stamps the slot with a new tick and leaves the queue
//! alone; eviction requeues a slot used since it was queued instead of
//! evicting it. Uses count up from [`FIRST_TICK`]; chunk files learned from
//! the directory are queued below it, oldest first.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use super::entry::CachedChunk;
use super::files::Listed;
use crate::id::ChunkId;

const FIRST_TICK: u64 = 1 << 62;

pub struct Slot {
    pub bytes: u64,
    /// Tick of the last use.
    pub tick: u64,
    /// Tick under which the slot sits in `Index::lru`. Behind `tick` when
    /// the slot was used since: a hit only bumps `tick`, and eviction
    /// requeues such slots instead of evicting them (lazy LRU: a hit costs
    /// one map lookup, not a reordering).
    pub queued: u64,
    /// The mapped file and the tick under which it sits in `Index::open`.
    pub handle: Option<(Arc<CachedChunk>, u64)>,
}

pub struct Index {
    pub slots: HashMap<ChunkId, Slot>,
    /// Every slot, by `Slot::queued`.
    pub lru: BTreeMap<u64, ChunkId>,
    /// Slots with a mapped file, by the tick they were queued under.
    pub open: BTreeMap<u64, ChunkId>,
    /// Uses count up from [`FIRST_TICK`]; files learned from a listing are
    /// queued below it, down from `low_tick`, the oldest lowest.
    tick: u64,
    low_tick: u64,
    /// The ledger's `inserted` when this process last listed the directory,
    /// plus what it has inserted since.
    pub seen_inserted: u64,
}

impl Index {
    pub fn new(seen_inserted: u64) -> Index {
        Index {
            slots: HashMap::new(),
            lru: BTreeMap::new(),
            open: BTreeMap::new(),
            tick: FIRST_TICK,
            low_tick: FIRST_TICK,
            seen_inserted,
        }
    }
}

impl Index {
    pub fn next_tick(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Takes `slot` (already out of `slots`) out of the queues.
    pub fn unqueue(&mut self, slot: &Slot) {
        self.lru.remove(&slot.queued);
        if let Some((_, t)) = &slot.handle {
            self.open.remove(t);
        }
    }

    /// Indexes listed chunk files not known yet as the least recently used,
    /// by modification time; how many.
    pub fn adopt(&mut self, mut listed: Vec<Listed>) -> u64 {
        listed.sort_by(|a, b| b.mtime.cmp(&a.mtime).then(b.id.cmp(&a.id)));
        let mut adopted = 0;
        for c in listed {
            if self.slots.contains_key(&c.id) {
                continue;
            }
            self.low_tick -= 1;
            let tick = self.low_tick;
            self.slots.insert(
                c.id,
                Slot {
                    bytes: c.bytes,
                    tick,
                    queued: tick,
                    handle: None,
                },
            );
            self.lru.insert(tick, c.id);
            adopted += 1;
        }
        adopted
    }

    /// Forgets every chunk not in `present`.
    pub fn forget_all_but(&mut self, present: &HashSet<ChunkId>) {
        let gone: Vec<ChunkId> = self
            .slots
            .keys()
            .filter(|id| !present.contains(id))
            .copied()
            .collect();
        for id in gone {
            let slot = self.slots.remove(&id).expect("listed above");
            self.unqueue(&slot);
        }
    }

    /// The least recently used chunk, out of the index, with its bytes.
    pub fn take_least_recent(&mut self) -> Option<(ChunkId, u64)> {
        let id = self.pop_least_recent()?;
        let slot = self.slots.remove(&id).expect("lru and slots agree");
        self.unqueue(&slot);
        Some((id, slot.bytes))
    }

    /// The least recently used chunk, taken out of `lru` (still in
    /// `slots`). Slots used since they were queued go to the back.
    pub fn pop_least_recent(&mut self) -> Option<ChunkId> {
        while let Some((queued, id)) = self.lru.pop_first() {
            let slot = self.slots.get_mut(&id).expect("lru and slots agree");
            if slot.tick == queued {
                return Some(id);
            }
            slot.queued = slot.tick;
            self.lru.insert(slot.tick, id);
        }
        None
    }

    /// Unmaps the least recently used files until at most `max` stay mapped.
    pub fn close_to(&mut self, max: usize) {
        while self.open.len() > max {
            let (queued, id) = self.open.pop_first().expect("non-empty");
            let slot = self.slots.get_mut(&id).expect("open and slots agree");
            let Some((h, _)) = slot.handle.take() else {
                continue;
            };
            if slot.tick != queued {
                // Used since it was mapped: keep it, queued anew. A slot's
                // own ticks never collide with another's.
                slot.handle = Some((h, slot.tick));
                self.open.insert(slot.tick, id);
            }
        }
    }
}
