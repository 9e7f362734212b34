//! Parsing one virtio-blk request out of a descriptor chain, trusting
//! nothing the guest wrote.
//!
//! The virtio spec lets the driver frame a request as it likes: what
//! counts is the device-readable area (a 16-byte header, then the data of
//! a write or the segments of a DISCARD / WRITE_ZEROES) followed by the
//! device-writable area (the data of a read or GET_ID, then the status: the
//! last byte of that area). Descriptors may split or join those parts.
//! Reads and writes must be whole blocks of the advertised block size at a
//! block-aligned sector: a partial block would need a read-modify-write
//! racing other requests to the same block. Every check that fails yields
//! a [`Rejection`] that says whether the guest can be told (a status byte
//! exists) and with which status.

use cairn_engine::le::{Reader, Truncated};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, Permissions};

pub const SECTOR: u64 = 512;
const HEADER_LEN: u64 = 16;
const SEGMENT_LEN: u64 = 16;

/// What the device advertises; requests beyond it are refused.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub capacity_sectors: u64,
    /// Data descriptors per request (SEG_MAX).
    pub seg_max: u32,
    /// Bytes per data descriptor (SIZE_MAX).
    pub size_max: u32,
    /// The logical block size (BLK_SIZE): reads, writes and zeroed ranges
    /// are whole blocks.
    pub block_size: u32,
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
    /// The header's sector (meaningful for reads and writes only).
    pub sector: u64,
    /// Data buffers in order (device-writable for reads and GET_ID,
    /// device-readable for writes).
    pub data: Vec<(GuestAddress, u32)>,
    pub data_len: u64,
    /// The last byte of the device-writable area.
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

type Area = Vec<(GuestAddress, u32)>;

fn area_len(area: &[(GuestAddress, u32)]) -> u64 {
    area.iter().map(|&(_, l)| u64::from(l)).sum()
}

/// Splits `area` after its first `n` bytes.
fn split_area(area: &[(GuestAddress, u32)], mut n: u64) -> (Area, Area) {
    let (mut head, mut tail) = (Vec::new(), Vec::new());
    for &(addr, len) in area {
        let take = n.min(u64::from(len));
        if take > 0 {
            head.push((addr, take as u32));
        }
        if take < u64::from(len) {
            tail.push((addr.unchecked_add(take), len - take as u32));
        }
        n -= take;
    }
    (head, tail)
}

/// The status byte of a chain whose last descriptor is `last`, if it is
/// device-writable, non-empty and in guest memory.
fn status_byte<M: GuestMemory>(last: &Descriptor, mem: &M) -> Option<GuestAddress> {
    let at = last
        .addr()
        .checked_add(u64::from(last.len()).checked_sub(1)?)?;
    (last.is_write_only() && mem.check_range(at, 1, Permissions::Write)).then_some(at)
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
            // Answer with the last status-like byte seen, if any: the chain
            // is too long.
            let status = all.last().and_then(|d| status_byte(d, mem));
            return Err(reject(
                status,
                VIRTIO_BLK_S_IOERR,
                format!("chain longer than {max_descs} descriptors"),
            ));
        }
        all.push(d);
    }
    let Some(last) = all.last() else {
        return Err(reject(None, VIRTIO_BLK_S_IOERR, "empty chain"));
    };
    let Some(status_at) = status_byte(last, mem) else {
        return Err(reject(
            None,
            VIRTIO_BLK_S_IOERR,
            "no device-writable status byte in guest memory at the end of the chain",
        ));
    };
    let status = Some(status_at);
    let ioerr = |why: String| reject(status, VIRTIO_BLK_S_IOERR, why);
    let first_writable = all
        .iter()
        .position(|d| d.is_write_only())
        .unwrap_or(all.len());
    if all[first_writable..].iter().any(|d| !d.is_write_only()) {
        return Err(ioerr(
            "a device-readable descriptor follows a device-writable one".into(),
        ));
    }
    for d in &all {
        let access = if d.is_write_only() {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(d.addr(), d.len() as usize, access) {
            return Err(ioerr(format!(
                "buffer {:#x}+{} is outside guest memory",
                d.addr().0,
                d.len()
            )));
        }
    }
    let area = |ds: &[Descriptor]| -> Area { ds.iter().map(|d| (d.addr(), d.len())).collect() };
    let readable = area(&all[..first_writable]);
    let writable = area(&all[first_writable..]);
    if area_len(&readable) < HEADER_LEN {
        return Err(ioerr(format!(
            "the device-readable header is shorter than {HEADER_LEN} bytes"
        )));
    }
    let (header_area, out) = split_area(&readable, HEADER_LEN);
    let mut header = [0u8; HEADER_LEN as usize];
    let mut at = 0usize;
    for (addr, len) in header_area {
        mem.read_slice(&mut header[at..at + len as usize], addr)
            .map_err(|e| ioerr(format!("header outside guest memory: {e}")))?;
        at += len as usize;
    }
    let (input, _status) = split_area(&writable, area_len(&writable) - 1);
    // `struct virtio_blk_outhdr`: type, ioprio (ignored), sector.
    let mut fields = Reader::new(&header);
    let field = |e: Truncated| ioerr(format!("request header: {e}"));
    let kind = fields.u32().map_err(field)?;
    fields.skip(4).map_err(field)?;
    let sector = fields.u64().map_err(field)?;
    // Device-writable bytes before the status of a request that returns
    // no data are left alone.
    let writes_guest = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
    let data = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID if !out.is_empty() => {
            return Err(ioerr(format!(
                "type {kind} data descriptor has the wrong direction (device-readable)"
            )))
        }
        _ if writes_guest => input,
        _ => out,
    };
    if let Some(&(_, len)) = data.iter().find(|&&(_, len)| len > limits.size_max) {
        return Err(ioerr(format!(
            "data descriptor of {len} bytes exceeds SIZE_MAX {}",
            limits.size_max
        )));
    }
    let data_len = area_len(&data);
    let block_sectors = u64::from(limits.block_size) / SECTOR;
    let kind = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            if data_len == 0
                || !data_len.is_multiple_of(u64::from(limits.block_size))
                || !sector.is_multiple_of(block_sectors)
            {
                return Err(ioerr(format!(
                    "{data_len} bytes at sector {sector} are not whole {}-byte blocks",
                    limits.block_size
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
                if !s.sector.is_multiple_of(block_sectors)
                    || !u64::from(s.sectors).is_multiple_of(block_sectors)
                {
                    return Err(ioerr(format!(
                        "segment of {} sectors at sector {} is not whole {}-byte blocks",
                        s.sectors, s.sector, limits.block_size
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
        status: status_at,
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
    if data_len == 0 || !data_len.is_multiple_of(SEGMENT_LEN) {
        return Err(format!(
            "segment list of {data_len} bytes is not a whole number of {SEGMENT_LEN}-byte segments"
        ));
    }
    if data_len / SEGMENT_LEN > u64::from(max_seg) {
        return Err(format!("more than {max_seg} segments"));
    }
    let mut bytes = Vec::with_capacity(data_len as usize);
    for &(addr, len) in data {
        let mut part = vec![0u8; len as usize];
        mem.read_slice(&mut part, addr)
            .map_err(|e| format!("segment list outside guest memory: {e}"))?;
        bytes.extend_from_slice(&part);
    }
    // `struct virtio_blk_discard_write_zeroes`: sector, num_sectors, flags.
    let mut r = Reader::new(&bytes);
    let mut segments = Vec::with_capacity(bytes.len() / SEGMENT_LEN as usize);
    while r.remaining() > 0 {
        let field = |e: Truncated| format!("segment list: {e}");
        let sector = r.u64().map_err(field)?;
        let sectors = r.u32().map_err(field)?;
        let flags = r.u32().map_err(field)?;
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 {
            return Err(format!("unknown segment flags {flags:#x}"));
        }
        segments.push(Segment {
            sector,
            sectors,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(segments)
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
        block_size: 4096,
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
        assert!(e.why.contains("whole"), "{e:?}");
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

    #[test]
    fn any_framing_is_taken_and_the_status_is_the_last_writable_byte() {
        let m = mem();
        let h = 0x10_0000;
        // A read whose data and status share one descriptor.
        header(&m, h, VIRTIO_BLK_T_IN, 8);
        let r = run(&m, &[desc(h, 16, false), desc(0x20_0000, 4097, true)]).unwrap();
        assert_eq!(r.kind, Kind::Read);
        assert_eq!(r.data, [(GuestAddress(0x20_0000), 4096)]);
        assert_eq!(r.status, GuestAddress(0x20_1000));
        // A write whose header and data share one descriptor, the status
        // at the end of a longer one.
        header(&m, h, VIRTIO_BLK_T_OUT, 16);
        let r = run(&m, &[desc(h, 16 + 8192, false), desc(0x30_0000, 8, true)]).unwrap();
        assert_eq!(r.kind, Kind::Write);
        assert_eq!((r.data_len, r.data[0].0), (8192, GuestAddress(h + 16)));
        assert_eq!(r.status, GuestAddress(0x30_0007));
        // A header split over two descriptors.
        header(&m, h, VIRTIO_BLK_T_FLUSH, 0);
        let r = run(
            &m,
            &[
                desc(h, 10, false),
                desc(h + 10, 6, false),
                desc(0x30_0000, 1, true),
            ],
        );
        assert_eq!(r.unwrap().kind, Kind::Flush);
        // Readable after writable.
        header(&m, h, VIRTIO_BLK_T_IN, 0);
        let e = run(
            &m,
            &[
                desc(h, 16, false),
                desc(0x20_0000, 4096, true),
                desc(0x21_0000, 4096, false),
                desc(0x30_0000, 1, true),
            ],
        )
        .unwrap_err();
        assert!(e.why.contains("follows"), "{e:?}");
        assert_eq!(e.status, Some(GuestAddress(0x30_0000)));
    }

    #[test]
    fn partial_blocks_are_refused_and_flush_ignores_its_sector() {
        let m = mem();
        let h = 0x10_0000;
        let st = desc(0x30_0000, 1, true);
        for (sector, len) in [(1, 4096), (8, 512), (8, 4096 + 512)] {
            header(&m, h, VIRTIO_BLK_T_OUT, sector);
            let e = run(&m, &[desc(h, 16, false), desc(0x20_0000, len, false), st]).unwrap_err();
            assert!(e.why.contains("whole"), "{e:?}");
        }
        let seg = |sector: u64, sectors: u32| {
            let mut s = [0u8; 16];
            s[0..8].copy_from_slice(&sector.to_le_bytes());
            s[8..12].copy_from_slice(&sectors.to_le_bytes());
            m.write_slice(&s, GuestAddress(0x20_0000)).unwrap();
        };
        header(&m, h, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        seg(3, 8);
        let e = run(&m, &[desc(h, 16, false), desc(0x20_0000, 16, false), st]).unwrap_err();
        assert!(e.why.contains("whole"), "{e:?}");
        header(&m, h, VIRTIO_BLK_T_FLUSH, u64::MAX);
        assert_eq!(
            run(&m, &[desc(h, 16, false), st]).unwrap().kind,
            Kind::Flush
        );
    }
}
