//! Hostile virtio-blk requests: the fuzzer writes a descriptor table
//! (addresses, lengths, flags, next indices: loops, indirect tables and
//! wild addresses included) and the guest memory the descriptors point at.
//! Parsing must never panic, and what it accepts must lie inside guest
//! memory and on the disk.
#![no_main]

use cairn_vmm_glue::blk::request::{parse, Kind, Limits, SECTOR};
use libfuzzer_sys::fuzz_target;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

const MEM: u64 = 0x20_0000;
/// Where the fuzzer's bytes land in guest memory (after the rings).
const DATA_AT: u64 = 0x1_0000;
const LIMITS: Limits = Limits {
    capacity_sectors: 4096,
    seg_max: 8,
    size_max: 64 << 10,
    block_size: 4096,
    max_discard_sectors: 2048,
    max_discard_seg: 4,
    max_write_zeroes_sectors: 2048,
    max_write_zeroes_seg: 4,
};

fn u64_at(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 16) + 1;
    if rest.len() < n * 16 {
        return;
    }
    let (table, payload) = rest.split_at(n * 16);
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
    // Addresses mostly land in memory (the low 22 bits: half of that range
    // is past its end); the top byte keeps some wild ones.
    let descs: Vec<RawDescriptor> = table
        .chunks_exact(16)
        .map(|d| {
            let raw = u64_at(d);
            let addr = if raw >> 56 == 0xff { raw } else { raw & 0x3f_ffff };
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap());
            let flags = u16::from_le_bytes(d[12..14].try_into().unwrap());
            let next = u16::from_le_bytes(d[14..16].try_into().unwrap()) % 16;
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        })
        .collect();
    let payload = &payload[..payload.len().min((MEM - DATA_AT) as usize)];
    mem.write_slice(payload, GuestAddress(DATA_AT)).unwrap();
    let q = MockSplitQueue::new(&mem, 16);
    let Ok(chain) = q.build_multiple_desc_chains(&descs) else {
        return;
    };
    match parse(chain, &mem, &LIMITS) {
        Ok(req) => {
            assert!(mem.check_range(req.status, 1, Permissions::Write));
            let mut total = 0u64;
            for &(addr, len) in &req.data {
                assert!(len <= LIMITS.size_max);
                assert!(
                    mem.check_range(addr, len as usize, Permissions::Read),
                    "data outside memory"
                );
                total += u64::from(len);
            }
            assert_eq!(total, req.data_len);
            if matches!(req.kind, Kind::Read | Kind::Write) {
                assert_eq!(req.data_len % u64::from(LIMITS.block_size), 0);
                assert_eq!(req.sector % (u64::from(LIMITS.block_size) / SECTOR), 0);
                assert!(req.sector + req.data_len / SECTOR <= LIMITS.capacity_sectors);
            }
            if let Kind::Discard(segs) | Kind::WriteZeroes(segs) = &req.kind {
                for s in segs {
                    assert!(s.sector + u64::from(s.sectors) <= LIMITS.capacity_sectors);
                }
            }
        }
        Err(rej) => {
            if let Some(at) = rej.status {
                assert!(mem.check_range(at, 1, Permissions::Write));
            }
        }
    }
});
