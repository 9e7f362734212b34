use std::fs;

use super::*;

const B: usize = BLOCK as usize;

fn base() -> ManifestId {
    ManifestId::from_bytes([7; 32])
}

fn fresh(blocks: u64) -> (tempfile::TempDir, Arc<Overlay>) {
    let dir = tempfile::tempdir().unwrap();
    let o = Overlay::open_or_create(dir.path(), &base(), blocks * BLOCK).unwrap();
    (dir, o)
}

fn read(o: &Overlay, b: u64) -> Vec<u8> {
    let mut buf = vec![0u8; B];
    o.read_blocks(b, &mut buf).unwrap();
    buf
}

/// Block `b` holds `fill` in every byte (a mismatch prints one line).
fn assert_block(o: &Overlay, b: u64, fill: u8) {
    let got = read(o, b);
    let bad = got.iter().position(|&x| x != fill);
    assert!(
        bad.is_none(),
        "block {b}: byte {bad:?} is {:#x}, want {fill:#x}",
        got[bad.unwrap_or(0)]
    );
}

fn dirty(o: &Overlay) -> Vec<u64> {
    (0..o.blocks()).filter(|&b| o.is_dirty(b)).collect()
}

/// Emulates a power cut for the data file: what no checkpoint synced is
/// lost (here: punched out, as a file system drops unwritten pages).
fn lose_unsynced_data(dir: &Path, blocks: &[u64]) {
    let f = fs::OpenOptions::new()
        .write(true)
        .open(dir.join(DATA))
        .unwrap();
    for &b in blocks {
        f.write_all_at(&[0u8; B], b * BLOCK).unwrap();
    }
}

#[test]
fn a_small_flush_is_one_sync_of_the_flush_log() {
    let (_dir, o) = fresh(64);
    o.write_blocks(3, &[0xab; 2 * B]).unwrap();
    o.zero_blocks(10, 1).unwrap();
    o.flush().unwrap();
    assert_eq!(
        o.syncs(),
        Syncs {
            data: 0,
            wal: 1,
            journal: 0
        }
    );
    // Rewrites and new blocks alike.
    o.write_blocks(3, &[0xcd; B]).unwrap();
    o.write_blocks(30, &[0xcd; B]).unwrap();
    o.flush().unwrap();
    assert_eq!(
        o.syncs(),
        Syncs {
            data: 0,
            wal: 2,
            journal: 0
        }
    );
    // Nothing new: nothing synced.
    o.flush().unwrap();
    assert_eq!(o.syncs().wal, 2);
    assert_eq!(dirty(&o), [3, 4, 10, 30]);
    assert_block(&o, 3, 0xcd);
    assert_block(&o, 4, 0xab);
    assert_block(&o, 10, 0);
    assert_eq!(o.stashed_blocks(), 0);
}

#[test]
fn flushed_writes_survive_losing_the_data_file_s_unsynced_pages() {
    let (dir, o) = fresh(64);
    o.write_blocks(3, &[0xab; 2 * B]).unwrap();
    o.flush().unwrap();
    o.write_blocks(4, &[0xcd; B]).unwrap();
    o.zero_blocks(5, 1).unwrap();
    o.write_blocks(5, &[0xee; B]).unwrap();
    o.zero_blocks(5, 1).unwrap();
    o.flush().unwrap();
    // Written after the last FLUSH: never acknowledged as durable.
    o.write_blocks(20, &[0x11; B]).unwrap();
    drop(o);
    lose_unsynced_data(dir.path(), &[3, 4, 5, 20]);
    let o = Overlay::open(dir.path()).unwrap();
    assert_eq!(dirty(&o), [3, 4, 5]);
    assert_block(&o, 3, 0xab);
    assert_block(&o, 4, 0xcd);
    assert_block(&o, 5, 0);
    // The replay checkpointed: the log's generation is over, the journal
    // names the blocks, and a second open replays nothing.
    assert_eq!(
        o.syncs(),
        Syncs {
            data: 1,
            wal: 0,
            journal: 1
        }
    );
    drop(o);
    let o = Overlay::open(dir.path()).unwrap();
    assert_eq!(o.syncs(), Syncs::default());
    assert_eq!(dirty(&o), [3, 4, 5]);
}

#[test]
fn a_large_flush_checkpoints_and_the_stash_stays_bounded() {
    let (dir, o) = fresh(4096);
    let stash_blocks = (STASH_BYTES / B) as u64;
    for b in 0..stash_blocks + 10 {
        o.write_blocks(b, &[(b % 251) as u8; B]).unwrap();
        assert!(o.stashed_blocks() as u64 <= stash_blocks);
    }
    assert_eq!(o.stashed_blocks(), 0, "spilled to the data file");
    o.flush().unwrap();
    assert_eq!(
        o.syncs(),
        Syncs {
            data: 1,
            wal: 0,
            journal: 1
        }
    );
    // The next epoch is small again.
    o.write_blocks(4000, &[9; B]).unwrap();
    o.flush().unwrap();
    assert_eq!(
        o.syncs(),
        Syncs {
            data: 1,
            wal: 1,
            journal: 1
        }
    );
    drop(o);
    lose_unsynced_data(dir.path(), &[4000]);
    let o = Overlay::open(dir.path()).unwrap();
    assert_eq!(o.dirty_count(), stash_blocks + 11);
    assert_block(&o, 500, (500 % 251) as u8);
    assert_block(&o, 4000, 9);
}

#[test]
fn a_guest_that_never_flushes_holds_each_block_once() {
    let (_dir, o) = fresh(64);
    for round in 0..100_000u32 {
        o.write_blocks(u64::from(round % 3), &[round as u8; B])
            .unwrap();
    }
    assert_eq!(o.stashed_blocks(), 3);
    o.flush().unwrap();
    assert_block(&o, 0, 99_999u32 as u8);
}

#[test]
fn writes_during_flushes_are_read_back_and_survive_a_reopen() {
    let (dir, o) = fresh(1024);
    let writer = {
        let o = o.clone();
        std::thread::spawn(move || {
            for round in 0..2000u64 {
                let b = round % 300;
                o.write_blocks(b, &[(round % 255) as u8 + 1; B]).unwrap();
                assert_eq!(read(&o, b)[0], (round % 255) as u8 + 1);
            }
        })
    };
    while !writer.is_finished() {
        o.flush().unwrap();
    }
    writer.join().unwrap();
    o.flush().unwrap();
    let expect: Vec<Vec<u8>> = (0..300).map(|b| read(&o, b)).collect();
    o.wait_for_checkpoint();
    drop(o);
    let o = Overlay::open(dir.path()).unwrap();
    for (b, want) in expect.iter().enumerate() {
        assert!(&read(&o, b as u64) == want, "block {b}");
    }
}

#[test]
fn a_short_last_block_round_trips_through_stash_log_and_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let size = 10 * BLOCK + 512;
    let o = Overlay::open_or_create(dir.path(), &base(), size).unwrap();
    o.write_blocks(10, &[0x5a; 512]).unwrap();
    let mut tail = [0u8; 512];
    o.read_blocks(10, &mut tail).unwrap();
    assert_eq!(tail, [0x5a; 512]);
    o.flush().unwrap();
    drop(o);
    lose_unsynced_data(dir.path(), &[]);
    let o = Overlay::open(dir.path()).unwrap();
    assert_eq!(fs::metadata(dir.path().join(DATA)).unwrap().len(), size);
    o.read_blocks(10, &mut tail).unwrap();
    assert_eq!(tail, [0x5a; 512]);
    o.zero_blocks(10, 1).unwrap();
    o.read_blocks(10, &mut tail).unwrap();
    assert_eq!(tail, [0; 512]);
}

#[test]
fn a_torn_last_log_batch_is_dropped() {
    let (dir, o) = fresh(64);
    o.write_blocks(1, &[1; B]).unwrap();
    o.flush().unwrap();
    o.write_blocks(2, &[2; B]).unwrap();
    o.flush().unwrap();
    drop(o);
    // The second batch's data never made it to the disk.
    let wal = fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(WAL))
        .unwrap();
    wal.write_all_at(&[0u8; 100], 2 * 8192 - 100).unwrap();
    lose_unsynced_data(dir.path(), &[1, 2]);
    let o = Overlay::open(dir.path()).unwrap();
    assert_eq!(dirty(&o), [1]);
    assert_block(&o, 1, 1);
}

#[test]
fn damage_before_the_tail_is_refused_and_the_files_kept() {
    let (dir, o) = fresh(64);
    for b in 1..=3 {
        o.write_blocks(b, &[b as u8; B]).unwrap();
        o.flush().unwrap();
    }
    drop(o);
    let wal_path = dir.path().join(WAL);
    let wal = fs::OpenOptions::new().write(true).open(&wal_path).unwrap();
    wal.write_all_at(&[0xee; 8], 8192 + 4096 + 16).unwrap();
    let before = fs::read(&wal_path).unwrap();
    let err = Overlay::open(dir.path()).err().unwrap();
    assert!(matches!(err, OverlayError::Malformed { .. }), "{err}");
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert_eq!(fs::read(&wal_path).unwrap(), before);

    // The journal: a bad batch with a good one after it.
    let (dir, o) = fresh(4096);
    for round in 0..3u8 {
        for b in 0..STASH_BYTES as u64 / BLOCK + 1 {
            o.write_blocks(u64::from(round) * 1000 + b, &[round; B])
                .unwrap();
        }
        o.flush().unwrap();
    }
    assert_eq!(o.syncs().journal, 3);
    drop(o);
    let path = dir.path().join(JOURNAL);
    let mut bytes = fs::read(&path).unwrap();
    bytes[journal::HEADER_LEN + 3] ^= 0x40;
    fs::write(&path, &bytes).unwrap();
    let err = Overlay::open(dir.path()).err().unwrap();
    assert!(err.to_string().contains("dirty.journal"), "{err}");
    assert_eq!(fs::read(&path).unwrap(), bytes);
}

#[test]
fn creation_happens_under_the_lock_and_never_wipes_a_live_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let o = Overlay::open_or_create(dir.path(), &base(), 64 * BLOCK).unwrap();
    o.write_blocks(1, &[1; B]).unwrap();
    o.flush().unwrap();
    // A second server on the same directory: busy, and nothing touched.
    let before: Vec<Vec<u8>> = [DATA, JOURNAL, WAL, files::META]
        .iter()
        .map(|f| fs::read(dir.path().join(f)).unwrap())
        .collect();
    assert!(matches!(
        Overlay::open_or_create(dir.path(), &base(), 64 * BLOCK),
        Err(OverlayError::Busy { .. })
    ));
    let after: Vec<Vec<u8>> = [DATA, JOURNAL, WAL, files::META]
        .iter()
        .map(|f| fs::read(dir.path().join(f)).unwrap())
        .collect();
    assert!(before == after);
    drop(o);

    // A creator holding the lock before its metadata exists: a second
    // creator must not touch the files it is making.
    let fresh_dir = tempfile::tempdir().unwrap();
    let held = files::lock(fresh_dir.path()).unwrap();
    fs::write(fresh_dir.path().join(DATA), b"being created").unwrap();
    assert!(matches!(
        Overlay::open_or_create(fresh_dir.path(), &base(), 64 * BLOCK),
        Err(OverlayError::Busy { .. })
    ));
    assert_eq!(
        fs::read(fresh_dir.path().join(DATA)).unwrap(),
        b"being created"
    );
    drop(held);
    // Once it is gone (it crashed before writing the metadata), the
    // leftover is replaced.
    let o = Overlay::open_or_create(fresh_dir.path(), &base(), 64 * BLOCK).unwrap();
    assert_eq!(o.dirty_count(), 0);
    assert_eq!(
        fs::metadata(fresh_dir.path().join(DATA)).unwrap().len(),
        64 * BLOCK
    );
}

#[test]
fn out_of_range_and_other_image_are_refused() {
    let (dir, o) = fresh(8);
    assert!(matches!(
        o.write_blocks(7, &[0; 2 * B]),
        Err(OverlayError::OutOfRange { .. })
    ));
    drop(o);
    let other = ManifestId::from_bytes([8; 32]);
    assert!(matches!(
        Overlay::open_or_create(dir.path(), &other, 8 * BLOCK),
        Err(OverlayError::OtherImage { .. })
    ));
}

#[test]
fn a_version_1_overlay_is_upgraded_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let meta = OverlayMeta {
        version: 1,
        base: base().to_hex(),
        logical_size: 16 * BLOCK,
        block_size: BLOCK,
    };
    fs::write(d.join(files::META), serde_json::to_vec(&meta).unwrap()).unwrap();
    let data = fs::File::create(d.join(DATA)).unwrap();
    data.set_len(16 * BLOCK).unwrap();
    data.write_all_at(&[3; B], 3 * BLOCK).unwrap();
    let records = [
        journal::v1::encode(journal::Extent { start: 3, count: 1 }),
        journal::v1::encode(journal::Extent { start: 9, count: 2 }),
    ]
    .concat();
    fs::write(d.join("journal"), &records[..40]).unwrap(); // a torn tail
    let o = Overlay::open(d).unwrap();
    assert_eq!(dirty(&o), [3]);
    assert_block(&o, 3, 3);
    assert_eq!(o.meta().version, files::META_VERSION);
    assert!(!d.join("journal").exists());
    o.write_blocks(4, &[4; B]).unwrap();
    o.flush().unwrap();
    drop(o);
    assert_eq!(dirty(&Overlay::open(d).unwrap()), [3, 4]);
}

#[test]
fn a_fresh_overlay_touches_the_disk_at_its_first_write_and_syncs_at_its_first_flush() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("layer");
    let o = Overlay::create_fresh(&dir, &base(), 64 * BLOCK);
    // Read, FLUSH and freeze-less use without a write: nothing on disk.
    assert_block(&o, 5, 0);
    o.flush().unwrap();
    assert!(!dir.exists());
    assert_eq!(o.syncs(), Syncs::default());
    // Held by the hook until the first FLUSH with writes.
    let hooked = Arc::new(AtomicU64::new(0));
    let h = hooked.clone();
    o.before_first_sync(Arc::new(move || {
        h.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }));
    o.write_blocks(5, &[0x5a; B]).unwrap();
    assert!(Overlay::is_whole(&dir), "made at the first write");
    assert_eq!(hooked.load(Ordering::SeqCst), 0, "nothing synced yet");
    assert_block(&o, 5, 0x5a);
    assert_block(&o, 6, 0);
    o.flush().unwrap();
    assert_eq!(hooked.load(Ordering::SeqCst), 1);
    o.write_blocks(6, &[0x6b; B]).unwrap();
    o.flush().unwrap();
    assert_eq!(hooked.load(Ordering::SeqCst), 1, "once");
    // Its lock is held from the first write on.
    assert!(matches!(
        Overlay::open(&dir),
        Err(OverlayError::Busy { .. })
    ));
    drop(o);
    let o = Overlay::open(&dir).unwrap();
    assert_eq!(dirty(&o), [5, 6]);
    assert_block(&o, 5, 0x5a);
    assert_block(&o, 6, 0x6b);
}

#[test]
fn a_fresh_overlay_whose_files_cannot_be_made_fails_its_write_and_is_poisoned() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("layer");
    let o = Overlay::create_fresh(&dir, &base(), 64 * BLOCK);
    fs::create_dir(&dir).unwrap();
    let e = o.write_blocks(1, &[1; B]).unwrap_err();
    assert!(matches!(e, OverlayError::Io { .. }), "{e}");
    assert!(o.is_poisoned());
    assert!(o.flush().is_err());
    assert!(!o.is_dirty(1));
}
