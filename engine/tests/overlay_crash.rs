//! The overlay on a file system that fails syncs and loses power on
//! demand (FaultFs, a FUSE fault injector): a failed sync poisons it, and
//! after a power cut every write acknowledged by a FLUSH is there and
//! nothing else is invented.

mod faultfs;

use std::sync::Arc;

use cairn_engine::overlay::{Overlay, OverlayError, BLOCK, STASH_BYTES};
use cairn_engine::ManifestId;
use faultfs::FaultFs;

const B: usize = BLOCK as usize;
const BLOCKS: u64 = 4096;

fn base() -> ManifestId {
    ManifestId::from_bytes([7; 32])
}

fn open(fs: &FaultFs) -> Arc<Overlay> {
    Overlay::open_or_create(fs.path(), &base(), BLOCKS * BLOCK).unwrap()
}

/// A block whose every 4-byte word is `tag` (0 is a zero block).
fn block(tag: u32) -> Vec<u8> {
    tag.to_le_bytes().repeat(B / 4)
}

/// The tag of a block the overlay holds; `None` for a mixed (torn) block.
fn tag_of(o: &Overlay, b: u64) -> Option<u32> {
    let mut buf = vec![0u8; B];
    o.read_blocks(b, &mut buf).unwrap();
    let tag = u32::from_le_bytes(buf[..4].try_into().unwrap());
    (buf == block(tag)).then_some(tag)
}

macro_rules! mount_or_skip {
    () => {
        match FaultFs::mount() {
            Some(fs) => fs,
            None => return,
        }
    };
}

#[test]
fn a_failed_sync_poisons_the_overlay_so_no_later_flush_claims_lost_writes() {
    // A small FLUSH (the flush log's sync), then a checkpoint's data sync,
    // then a checkpoint's journal sync fail in turn.
    for (case, pass) in [("log", 0), ("data", 0), ("journal", 1)] {
        let fs = mount_or_skip!();
        let o = open(&fs);
        o.write_blocks(1, &block(11)).unwrap();
        o.flush().unwrap();
        let big = case != "log";
        let n = if big {
            STASH_BYTES as u64 / BLOCK + 1
        } else {
            1
        };
        for b in 0..n {
            o.write_blocks(100 + b, &block(22)).unwrap();
        }
        fs.fail_syncs(pass, 1);
        let err = o.flush().unwrap_err();
        assert!(matches!(err, OverlayError::Io { .. }), "{case}: {err}");
        assert_eq!(fs.failed_syncs(), 1, "{case}");
        // Linux reports the error once: the sync would succeed now, with
        // the writes lost. The overlay must not say they are durable.
        let again = o.flush().unwrap_err();
        assert!(
            matches!(again, OverlayError::Poisoned { .. }),
            "{case}: {again}"
        );
        assert!(o.write_blocks(2, &block(33)).is_err(), "{case}");
        assert!(o.read_blocks(1, &mut vec![0u8; B]).is_err(), "{case}");
        assert!(o.is_poisoned());
        // A restart replays what was durable.
        drop(o);
        fs.power_cut();
        let o = Overlay::open(fs.path()).unwrap();
        assert_eq!(tag_of(&o, 1), Some(11), "{case}");
        for b in 100..100 + n {
            // Never acknowledged: there or not, but never anything else.
            assert!(
                !o.is_dirty(b) || tag_of(&o, b) == Some(22),
                "{case}: block {b}"
            );
        }
        assert!(!o.is_dirty(2));
    }
}

/// What a block may read as after a crash.
#[derive(Clone, Default)]
struct Expect {
    /// At the last FLUSH that succeeded (`None`: the image's).
    durable: Option<u32>,
    /// Written since.
    since: Vec<u32>,
}

#[test]
fn after_power_cuts_every_flushed_write_is_there_and_nothing_is_invented() {
    let fs = mount_or_skip!();
    let mut rng = fastrand::Rng::with_seed(0x0b5e_55ed);
    let mut model = vec![Expect::default(); BLOCKS as usize];
    let mut next_tag = 1u32;
    let mut o = open(&fs);
    for round in 0..12 {
        for _epoch in 0..rng.usize(1..6) {
            // Small epochs mostly (logged), now and then a large one
            // (checkpointed) or a discard.
            let writes = match rng.u8(..10) {
                0 => STASH_BYTES / B + rng.usize(1..200),
                _ => rng.usize(1..40),
            };
            for _ in 0..writes {
                let first = rng.u64(..BLOCKS - 8);
                let count = rng.u64(1..4);
                if rng.u8(..20) == 0 {
                    o.zero_blocks(first, count).unwrap();
                    for b in first..first + count {
                        model[b as usize].since.push(0);
                    }
                    continue;
                }
                let mut data = Vec::new();
                for b in first..first + count {
                    data.extend(block(next_tag));
                    model[b as usize].since.push(next_tag);
                    next_tag += 1;
                }
                o.write_blocks(first, &data).unwrap();
            }
            o.flush().unwrap();
            for m in &mut model {
                if let Some(&last) = m.since.last() {
                    m.durable = Some(last);
                    m.since.clear();
                }
            }
        }
        // Unflushed writes, then the power goes (after a checkpoint running
        // in the background, if any, ended: it holds the overlay open).
        for _ in 0..rng.usize(0..30) {
            let b = rng.u64(..BLOCKS);
            o.write_blocks(b, &block(next_tag)).unwrap();
            model[b as usize].since.push(next_tag);
            next_tag += 1;
        }
        o.wait_for_checkpoint();
        drop(o);
        fs.power_cut();
        o = Overlay::open(fs.path()).unwrap();
        for (b, m) in model.iter_mut().enumerate() {
            let b = b as u64;
            let got = o.is_dirty(b).then(|| tag_of(&o, b));
            let ok = match got {
                None => m.durable.is_none(),
                Some(None) => false,
                Some(Some(t)) => m.durable == Some(t) || m.since.contains(&t),
            };
            assert!(
                ok,
                "round {round}, block {b}: read {got:?}, durable {:?}, written since {:?}",
                m.durable, m.since
            );
            m.durable = got.flatten();
            m.since.clear();
        }
    }
    let syncs = o.syncs();
    println!("last open: {syncs:?}");
}

#[test]
fn a_crash_while_the_flush_log_s_full_half_is_checkpointed_loses_nothing() {
    let fs = mount_or_skip!();
    let o = open(&fs);
    // The background checkpoint of the first full half will fail at its
    // journal sync: the journal never says that generation is done, while
    // FLUSHes go on in the other half.
    fs.fail_syncs_of("dirty.journal", 1);
    let mut acked = Vec::new();
    let mut after_rotation = 0;
    for i in 0..20_000u32 {
        let b = u64::from(i) % 3000;
        // Once the background checkpoint failed, writes and FLUSHes fail.
        if o.write_blocks(b, &block(i + 1)).is_err() || o.flush().is_err() {
            break;
        }
        acked.push((b, i + 1));
        if o.syncs().data > 0 {
            after_rotation += 1;
            if after_rotation == 200 {
                break;
            }
        }
    }
    assert!(o.syncs().data > 0, "the first half never filled");
    o.wait_for_checkpoint();
    assert!(
        o.is_poisoned(),
        "the background checkpoint's failure poisons"
    );
    drop(o);
    fs.power_cut();
    let o = Overlay::open(fs.path()).unwrap();
    let mut last = std::collections::HashMap::new();
    for (b, tag) in acked {
        last.insert(b, tag);
    }
    for (b, tag) in last {
        assert_eq!(tag_of(&o, b), Some(tag), "block {b}");
    }
}

#[test]
fn writes_racing_flushes_survive_a_power_cut() {
    let fs = mount_or_skip!();
    let o = open(&fs);
    let writer = {
        let o = o.clone();
        std::thread::spawn(move || {
            for round in 0..3000u32 {
                let b = u64::from(round % 300);
                o.write_blocks(b, &block(round + 1)).unwrap();
                assert_eq!(tag_of(&o, b), Some(round + 1));
            }
        })
    };
    while !writer.is_finished() {
        o.flush().unwrap();
    }
    writer.join().unwrap();
    o.flush().unwrap();
    let expect: Vec<Option<u32>> = (0..300).map(|b| tag_of(&o, b)).collect();
    o.wait_for_checkpoint();
    drop(o);
    fs.power_cut();
    let o = Overlay::open(fs.path()).unwrap();
    for (b, want) in expect.iter().enumerate() {
        assert_eq!(&tag_of(&o, b as u64), want, "block {b}");
    }
}
