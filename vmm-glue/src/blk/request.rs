//! Parsing one virtio-blk request out of a descriptor chain, trusting
//! nothing the guest wrote.
//!
//! A request is a header (type, priority, sector) in a device-readable
//! descriptor, data descriptors whose direction must match the type, and a
//! one-byte status in a device-writable descriptor at the end. Every check
//! that fails yields a [`Rejection`] that says whether the guest can be
//! told (a status byte exists) and with which status.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

pub const SECTOR: u64 = 512;
const HEADER_LEN: u32 = 16;
const SEGMENT_LEN: u32 = 16;

/// What the device advertises; requests beyond it are refused.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub capacity_sectors: u64,
    /// Data descriptors per request (SEG_MAX).
    pub seg_max: u32,
    /// Bytes per data descriptor (SIZE_MAX).
    pub size_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
}

/// One range of a DISCARD or WRITE_ZEROES request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub sector: u64,
    pub sectors: u32,
    pub unmap: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Read,
    Write,
    Flush,
    GetId,
    Discard(Vec<Segment>),
    WriteZeroes(Vec<Segment>),
}

/// A validated request: every address lies in guest memory, every range
/// on the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub kind: Kind,
    pub sector: u64,
    /// Data buffers in order (device-writable for reads and GET_ID,
    /// device-readable for writes).
    pub data: Vec<(GuestAddress, u32)>,
    pub data_len: u64,
    pub status: GuestAddress,
}

/// Why a chain was refused. With `status` the guest gets `code`; without
/// one it can only be returned unanswered (used length 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub status: Option<GuestAddress>,
    pub code: u8,
    pub why: String,
}

fn reject(status: Option<GuestAddress>, code: u32, why: impl Into<String>) -> Rejection {
    Rejection {
        status,
        code: code as u8,
        why: why.into(),
    }
}

/// Parses the chain `descs` (at most `seg_max + 2` descriptors are looked
/// at) against guest memory `mem`.
pub fn parse<M: GuestMemory>(
    descs: impl IntoIterator<Item = Descriptor>,
    mem: &M,
    limits: &Limits,
) -> Result<Request, Rejection> {
    let max_descs = limits.seg_max as usize + 2;
    let mut all: Vec<Descriptor> = Vec::new();
    for d in descs {
        if all.len() == max_descs {
            // Find the status, if any, to answer: the chain is too long.
            let status = all
                .last()
                .filter(|d| d.is_write_only() && mem.check_range(d.addr(), 1, Permissions::Write))
                .map(|d| d.addr());
            return Err(reject(
                status,
                VIRTIO_BLK_S_IOERR,
                format!("chain longer than {max_descs} descriptors"),
            ));
        }
        all.push(d);
    }
    let Some(last) = all.last().copied() else {
        return Err(reject(None, VIRTIO_BLK_S_IOERR, "empty chain"));
    };
    if !last.is_write_only()
        || last.len() < 1
        || !mem.check_range(last.addr(), 1, Permissions::Write)
    {
        return Err(reject(
            None,
            VIRTIO_BLK_S_IOERR,
            "no device-writable status byte in guest memory at the end of the chain",
        ));
    }
    let status = Some(last.addr());
    let ioerr = |why: String| reject(status, VIRTIO_BLK_S_IOERR, why);
    if all.len() < 2 {
        return Err(ioerr("no header descriptor".into()));
    }
    let head = all[0];
    if head.is_write_only() || head.len() < HEADER_LEN {
        return Err(ioerr(format!(
            "header descriptor is device-writable or shorter than {HEADER_LEN} bytes"
        )));
    }
    let mut header = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut header, head.addr())
        .map_err(|e| ioerr(format!("header outside guest memory: {e}")))?;
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let data_descs = &all[1..all.len() - 1];
    let writable = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
    let mut data = Vec::with_capacity(data_descs.len());
    let mut data_len = 0u64;
    for d in data_descs {
        if d.is_write_only() != writable {
            return Err(ioerr(format!(
                "type {kind} data descriptor has the wrong direction"
            )));
        }
        if d.len() > limits.size_max {
            return Err(ioerr(format!(
                "data descriptor of {} bytes exceeds SIZE_MAX {}",
                d.len(),
                limits.size_max
            )));
        }
        let access = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(d.addr(), d.len() as usize, access) {
            return Err(ioerr(format!(
                "data buffer {:#x}+{} is outside guest memory",
                d.addr().0,
                d.len()
            )));
        }
        data.push((d.addr(), d.len()));
        data_len += u64::from(d.len());
    }
    let kind = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            if data_len == 0 || !data_len.is_multiple_of(SECTOR) {
                return Err(ioerr(format!(
                    "data length {data_len} is zero or not a multiple of {SECTOR}"
                )));
            }
            check_sectors(sector, data_len / SECTOR, limits).map_err(ioerr)?;
            if kind == VIRTIO_BLK_T_IN {
                Kind::Read
            } else {
                Kind::Write
            }
        }
        VIRTIO_BLK_T_FLUSH => Kind::Flush,
        VIRTIO_BLK_T_GET_ID => {
            if data_len < u64::from(VIRTIO_BLK_ID_BYTES) {
                return Err(ioerr(format!(
                    "GET_ID buffer of {data_len} bytes is under {VIRTIO_BLK_ID_BYTES}"
                )));
            }
            Kind::GetId
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let zeroes = kind == VIRTIO_BLK_T_WRITE_ZEROES;
            let (max_seg, max_sectors) = if zeroes {
                (limits.max_write_zeroes_seg, limits.max_write_zeroes_sectors)
            } else {
                (limits.max_discard_seg, limits.max_discard_sectors)
            };
            let segs = read_segments(mem, &data, data_len, max_seg).map_err(ioerr)?;
            for s in &segs {
                if s.unmap && !zeroes {
                    return Err(ioerr("DISCARD segment with flags set".into()));
                }
                if s.sectors == 0 || s.sectors > max_sectors {
                    return Err(ioerr(format!(
                        "segment of {} sectors (limit {max_sectors})",
                        s.sectors
                    )));
                }
                check_sectors(s.sector, u64::from(s.sectors), limits).map_err(ioerr)?;
            }
            if zeroes {
                Kind::WriteZeroes(segs)
            } else {
                Kind::Discard(segs)
            }
        }
        other => {
            return Err(reject(
                status,
                VIRTIO_BLK_S_UNSUPP,
                format!("unsupported request type {other}"),
            ))
        }
    };
    Ok(Request {
        kind,
        sector,
        data,
        data_len,
        status: last.addr(),
    })
}

fn check_sectors(sector: u64, count: u64, limits: &Limits) -> Result<(), String> {
    match sector.checked_add(count) {
        Some(end) if end <= limits.capacity_sectors => Ok(()),
        _ => Err(format!(
            "sectors {sector}+{count} are past the disk's {} sectors",
            limits.capacity_sectors
        )),
    }
}

fn read_segments<M: GuestMemory>(
    mem: &M,
    data: &[(GuestAddress, u32)],
    data_len: u64,
    max_seg: u32,
) -> Result<Vec<Segment>, String> {
    if data_len == 0 || !data_len.is_multiple_of(u64::from(SEGMENT_LEN)) {
        return Err(format!(
            "segment list of {data_len} bytes is not a whole number of {SEGMENT_LEN}-byte segments"
        ));
    }
    if data_len / u64::from(SEGMENT_LEN) > u64::from(max_seg) {
        return Err(format!("more than {max_seg} segments"));
    }
    let mut bytes = Vec::with_capacity(data_len as usize);
    for &(addr, len) in data {
        let mut part = vec![0u8; len as usize];
        mem.read_slice(&mut part, addr)
            .map_err(|e| format!("segment list outside guest memory: {e}"))?;
        bytes.extend_from_slice(&part);
    }
    bytes
        .chunks_exact(SEGMENT_LEN as usize)
        .map(|s| {
            let flags = u32::from_le_bytes(s[12..16].try_into().expect("4 bytes"));
            if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
                return Err(format!("unknown segment flags {flags:#x}"));
            }
            Ok(Segment {
                sector: u64::from_le_bytes(s[0..8].try_into().expect("8 bytes")),
                sectors: u32::from_le_bytes(s[8..12].try_into().expect("4 bytes")),
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryMmap;

    const MEM: u64 = 0x100_0000;
    const LIMITS: Limits = Limits {
        capacity_sectors: 2048,
        seg_max: 4,
        size_max: 64 << 10,
        max_discard_sectors: 1024,
        max_discard_seg: 2,
        max_write_zeroes_sectors: 1024,
        max_write_zeroes_seg: 2,
    };

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
    }

    fn desc(addr: u64, len: u32, write: bool) -> RawDescriptor {
        let flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    fn header(m: &GuestMemoryMmap, at: u64, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        m.write_slice(&h, GuestAddress(at)).unwrap();
    }

    /// Builds the chain in a mock queue and parses it.
    fn run(m: &GuestMemoryMmap, descs: &[RawDescriptor]) -> Result<Request, Rejection> {
        let q = MockSplitQueue::new(m, 16);
        let chain = q.build_desc_chain(descs).unwrap();
        parse(chain, m, &LIMITS)
    }

    #[test]
    fn a_well_formed_read_parses() {
        let m = mem();
        header(&m, 0x10_0000, VIRTIO_BLK_T_IN, 8);
        let r = run(
            &m,
            &[
                desc(0x10_0000, 16, false),
                desc(0x20_0000, 4096, true),
                desc(0x30_0000, 1, true),
            ],
        )
        .unwrap();
        assert_eq!(r.kind, Kind::Read);
        assert_eq!(
            (r.sector, r.data_len, r.status),
            (8, 4096, GuestAddress(0x30_0000))
        );
    }

    #[test]
    fn hostile_chains_get_an_error_status_or_none() {
        let m = mem();
        let h = 0x10_0000;
        let case = |kind: u32, sector: u64, descs: &[RawDescriptor]| {
            header(&m, h, kind, sector);
            run(&m, descs).unwrap_err()
        };
        let hd = desc(h, 16, false);
        let st = desc(0x30_0000, 1, true);
        // Read past the end of the disk.
        let e = case(
            VIRTIO_BLK_T_IN,
            2047,
            &[hd, desc(0x20_0000, 1024, true), st],
        );
        assert_eq!(e.code, VIRTIO_BLK_S_IOERR as u8);
        // Read into a device-readable buffer (wrong direction).
        let e = case(VIRTIO_BLK_T_IN, 0, &[hd, desc(0x20_0000, 512, false), st]);
        assert!(e.why.contains("direction"), "{e:?}");
        // Write from a buffer outside guest memory.
        let e = case(VIRTIO_BLK_T_OUT, 0, &[hd, desc(MEM - 256, 512, false), st]);
        assert!(e.why.contains("outside guest memory"), "{e:?}");
        // Zero-length and unaligned data.
        let e = case(VIRTIO_BLK_T_IN, 0, &[hd, st]);
        assert_eq!(e.code, VIRTIO_BLK_S_IOERR as u8);
        let e = case(VIRTIO_BLK_T_IN, 0, &[hd, desc(0x20_0000, 100, true), st]);
        assert!(e.why.contains("multiple"), "{e:?}");
        // Oversized descriptor.
        let e = case(
            VIRTIO_BLK_T_IN,
            0,
            &[hd, desc(0x20_0000, 128 << 10, true), st],
        );
        assert!(e.why.contains("SIZE_MAX"), "{e:?}");
        // Unknown type: UNSUPP.
        let e = case(77, 0, &[hd, st]);
        assert_eq!(e.code, VIRTIO_BLK_S_UNSUPP as u8);
        // Too many descriptors.
        let many = [
            hd,
            desc(0x20_0000, 512, true),
            desc(0x20_1000, 512, true),
            desc(0x20_2000, 512, true),
            desc(0x20_3000, 512, true),
            desc(0x20_4000, 512, true),
            st,
        ];
        let e = case(VIRTIO_BLK_T_IN, 0, &many);
        assert!(e.why.contains("longer"), "{e:?}");
        // Too many, and the last one looked at lies outside guest memory
        // (found by the fuzzer): no status to write.
        let mut wild = many;
        wild[5] = desc(MEM + 4096, 512, true);
        let e = case(VIRTIO_BLK_T_IN, 0, &wild);
        assert!(e.why.contains("longer") && e.status.is_none(), "{e:?}");
        // No writable status: cannot be answered.
        let e = case(
            VIRTIO_BLK_T_IN,
            0,
            &[hd, desc(0x20_0000, 512, true), desc(0x30_0000, 1, false)],
        );
        assert_eq!(e.status, None);
        // Header in device-writable memory.
        let e = case(VIRTIO_BLK_T_IN, 0, &[desc(h, 16, true), st]);
        assert!(e.why.contains("header"), "{e:?}");
    }

    #[test]
    fn discard_and_write_zeroes_segments_are_checked() {
        let m = mem();
        let h = 0x10_0000;
        let seg = |at: u64, sector: u64, sectors: u32, flags: u32| {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&sectors.to_le_bytes());
            s[12..16].copy_from_slice(&flags.to_le_bytes());
            m.write_slice(&s, GuestAddress(at)).unwrap();
        };
        let st = desc(0x30_0000, 1, true);
        header(&m, h, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        seg(0x20_0000, 16, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let r = run(&m, &[desc(h, 16, false), desc(0x20_0000, 16, false), st]).unwrap();
        assert_eq!(
            r.kind,
            Kind::WriteZeroes(vec![Segment {
                sector: 16,
                sectors: 8,
                unmap: true
            }])
        );
        header(&m, h, VIRTIO_BLK_T_DISCARD, 0);
        let e = run(&m, &[desc(h, 16, false), desc(0x20_0000, 16, false), st]).unwrap_err();
        assert!(e.why.contains("flags"), "{e:?}");
        seg(0x20_0000, 2040, 16, 0);
        let e = run(&m, &[desc(h, 16, false), desc(0x20_0000, 16, false), st]).unwrap_err();
        assert!(e.why.contains("past"), "{e:?}");
        let e = run(&m, &[desc(h, 16, false), desc(0x20_0000, 12, false), st]).unwrap_err();
        assert!(e.why.contains("whole number"), "{e:?}");
    }
}
