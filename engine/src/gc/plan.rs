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

use std::collections::HashSet;

use super::homes::PackFacts;
use super::state::{Condemned, GcState};
use crate::id::PackId;
use crate::layout;
use crate::pack::{IndexEntry, PackIndex, FOOTER_LEN, INDEX_ENTRY_LEN};

/// The size of the pack object an index describes.
pub fn pack_bytes(index: &PackIndex) -> u64 {
    index.index_offset() + (index.entries.len() * INDEX_ENTRY_LEN + FOOTER_LEN) as u64
}

/// What the mark found, as the planner needs it.
pub struct Marked {
    /// Every pack, with the live chunks homed in it (see [`super::homes`]).
    pub packs: Vec<PackFacts>,
    /// Live chunks that no pack holds.
    pub missing_chunks: u64,
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

pub fn plan(marked: Marked, state: &GcState, rules: &Rules) -> Plan {
    let mut plan = Plan {
        missing_chunks: marked.missing_chunks,
        ..Plan::default()
    };
    let keys: HashSet<String> = marked
        .packs
        .iter()
        .map(|p| layout::pack_key(&p.id))
        .collect();
    for p in marked.packs {
        let key = layout::pack_key(&p.id);
        plan.pack_bytes += p.bytes;
        plan.live_bytes += p.kept;
        if p.homed == 0 {
            decide_dead(&mut plan, state, rules, key, p.bytes);
        } else if state.is_condemned(&key) {
            plan.uncondemn.push(key);
        } else if super::homes::is_sparse(p.kept, p.frames, rules.rewrite_below) {
            plan.rewrite.push(Rewrite {
                pack: p.id,
                bytes: p.bytes,
                keep: p.keep,
            });
        }
    }
    let dead: HashSet<&str> = marked
        .dead_objects
        .iter()
        .map(|(k, _)| k.as_str())
        .collect();
    for (key, bytes) in &marked.dead_objects {
        decide_dead(&mut plan, state, rules, key.clone(), *bytes);
    }
    // Condemned objects that are not packs and are live again.
    for key in state.condemned.keys().chain(state.deleting.keys()) {
        if !keys.contains(key) && !dead.contains(key.as_str()) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gc::homes::Mark;
    use crate::id::ChunkId;
    use crate::pack::PACK_HEADER_LEN;

    const FRAME: u32 = 1000;

    fn chunk(n: u8) -> ChunkId {
        ChunkId::of(&[n])
    }

    /// A pack of `chunks`, each a 1000-byte frame.
    fn pack(chunks: &[u8]) -> PackIndex {
        let entries = chunks
            .iter()
            .enumerate()
            .map(|(i, &n)| IndexEntry {
                id: chunk(n),
                offset: PACK_HEADER_LEN + i as u64 * u64::from(FRAME),
                frame_len: FRAME,
                raw_len: 4096,
            })
            .collect();
        PackIndex::from_entries(entries)
    }

    fn live(chunks: &[u8]) -> Vec<ChunkId> {
        chunks.iter().map(|&n| chunk(n)).collect()
    }

    /// The mark of `packs` and `live`, through the spills and the join a
    /// run uses.
    fn mark(packs: &[PackIndex], live: &[ChunkId], state: &GcState, rules: &Rules) -> Marked {
        let dir = tempfile::tempdir().unwrap();
        let mut m = Mark::new(dir.path());
        for id in live {
            m.live(id).unwrap();
        }
        for p in packs {
            m.pack(p).unwrap();
        }
        let homes = m
            .homes(
                |id| state.is_condemned(&layout::pack_key(id)),
                rules.rewrite_below,
            )
            .unwrap();
        Marked {
            packs: homes.packs,
            missing_chunks: homes.missing_chunks,
            dead_objects: Vec::new(),
        }
    }

    const RULES: Rules = Rules {
        mark_ms: 100_000,
        grace_ms: 10_000,
        rewrite_below: 0.5,
    };

    fn plan_of(packs: &[PackIndex], live: &[ChunkId], state: &GcState, rules: &Rules) -> Plan {
        plan(mark(packs, live, state, rules), state, rules)
    }

    fn condemned_at(state: &mut GcState, key: &str, at_ms: u64) {
        state
            .condemned
            .insert(key.to_owned(), Condemned { at_ms, bytes: 7 });
    }

    #[test]
    fn a_dead_pack_is_condemned_then_deleted_only_after_the_grace_period() {
        let packs = [pack(&[1, 2]), pack(&[3, 4])];
        let live = live(&[1, 2]);
        let dead = layout::pack_key(&packs[1].id);

        let first = plan_of(&packs, &live, &GcState::default(), &RULES);
        assert_eq!(first.condemn, vec![(dead.clone(), pack_bytes(&packs[1]))]);
        assert!(first.delete.is_empty() && first.rewrite.is_empty());

        let mut state = GcState::default();
        condemned_at(&mut state, &dead, RULES.mark_ms - RULES.grace_ms + 1);
        let early = plan_of(&packs, &live, &state, &RULES);
        assert!(early.delete.is_empty() && early.condemn.is_empty());
        assert_eq!((early.waiting, early.waiting_bytes), (1, 7));

        condemned_at(&mut state, &dead, RULES.mark_ms - RULES.grace_ms);
        let due = plan_of(&packs, &live, &state, &RULES);
        assert_eq!(due.delete.len(), 1);
        assert_eq!(due.delete[0].0, dead);
    }

    #[test]
    fn a_condemned_pack_referenced_again_is_taken_off_the_list() {
        let packs = [pack(&[1, 2])];
        let live = live(&[2]);
        let mut state = GcState::default();
        let key = layout::pack_key(&packs[0].id);
        condemned_at(&mut state, &key, 0);
        let p = plan_of(&packs, &live, &state, &RULES);
        assert_eq!(p.uncondemn, vec![key]);
        assert!(p.delete.is_empty());
    }

    #[test]
    fn a_sparse_pack_is_rewritten_with_only_its_live_frames() {
        let packs = [pack(&[1, 2, 3, 4, 5])];
        let p = plan_of(&packs, &live(&[2, 9]), &GcState::default(), &RULES);
        assert_eq!(p.rewrite.len(), 1);
        let keep: Vec<ChunkId> = p.rewrite[0].keep.iter().map(|e| e.id).collect();
        assert_eq!(keep, vec![chunk(2)]);
        assert_eq!(p.missing_chunks, 1, "chunk 9 is in no pack");
        // At half live or more it stays; with rewriting off, always.
        let p = plan_of(&packs, &live(&[1, 2, 3]), &GcState::default(), &RULES);
        assert!(p.rewrite.is_empty());
        let off = Rules {
            rewrite_below: 0.0,
            ..RULES
        };
        let p = plan_of(&packs, &live(&[2]), &GcState::default(), &off);
        assert!(p.rewrite.is_empty());
    }

    #[test]
    fn a_chunk_in_two_packs_keeps_one_home_and_never_a_condemned_one() {
        // The old pack (condemned after a rewrite) and its copy both hold
        // chunk 2: the copy is the home, the old pack dead.
        let old = pack(&[1, 2]);
        let copy = pack(&[2]);
        let packs = [old.clone(), copy.clone()];
        let live = live(&[2]);
        let mut state = GcState::default();
        condemned_at(&mut state, &layout::pack_key(&old.id), 0);
        let p = plan_of(&packs, &live, &state, &RULES);
        assert_eq!(p.delete.len(), 1);
        assert_eq!(p.delete[0].0, layout::pack_key(&old.id));
        assert!(p.uncondemn.is_empty() && p.condemn.is_empty());
        // Neither condemned: exactly one of the two is dead, not both.
        let p = plan_of(&packs, &live, &GcState::default(), &RULES);
        assert_eq!(p.condemn.len(), 1);
    }

    #[test]
    fn objects_other_than_packs_follow_the_same_rule() {
        let mut state = GcState::default();
        condemned_at(&mut state, "manifests/old", 0);
        condemned_at(&mut state, "vmstate/back", 0);
        state
            .deleting
            .insert("wsets/half".into(), Condemned { at_ms: 0, bytes: 1 });
        let dead = vec![
            ("manifests/old".to_owned(), 5),
            ("manifests/new".to_owned(), 6),
            ("wsets/half".to_owned(), 1),
        ];
        let p = plan(
            Marked {
                packs: Vec::new(),
                missing_chunks: 0,
                dead_objects: dead,
            },
            &state,
            &RULES,
        );
        let deleted: Vec<&str> = p.delete.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            deleted,
            ["manifests/old", "wsets/half"],
            "a deletion cut short is finished"
        );
        assert_eq!(p.condemn, vec![("manifests/new".to_owned(), 6)]);
        assert_eq!(
            p.uncondemn,
            vec!["vmstate/back".to_owned()],
            "referenced again"
        );
    }
}
